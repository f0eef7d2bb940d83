"""The unlearning loop: data, objectives, configuration, the ``Trainer`` and :func:`fastunlearn.unlearn`.

- :mod:`~fastunlearn.data.examples`: JSON Lines records → tokenised examples → padded forget/retain
  batches, the same pipeline evaluation uses.
- :mod:`~fastunlearn.data.tofu_format`: TOFU's own tokenisation (SPEC §4.1), the ``tofu-*``
  templates of ``training.data`` and the legacy TOFU evaluation.
- :mod:`~fastunlearn.methods`: the objectives (a forget term plus a retain term; the field's methods as
  presets), computed by the model patched with :func:`fastunlearn.patch`.
- :mod:`~fastunlearn.options.unlearn`: :class:`UnlearnConfig` and :class:`UnlearnResult`.
- :mod:`~fastunlearn.options.flags`: the options' command-line flags (parser, recorded command, messages).
- :mod:`~fastunlearn.training.preflight`: everything checked before the model's weights load.
- :mod:`~fastunlearn.training.outputs`: the output directory's states, staging, swap and resume.
- :mod:`~fastunlearn.models.precision`: what ``precision`` resolves to, the dtype a model is loaded
  in, and what is refused.
- :mod:`~fastunlearn.training.trainer`: :class:`UnlearnTrainer`, a ``transformers.Trainer``.
- :mod:`~fastunlearn.training.run`: :func:`unlearn`, from a model and data to files on disk.

Importing this package loads none of its modules, so evaluation can use ``training.data`` (and
``training.tofu_format``) without ``transformers``. The public names are ``fastunlearn.unlearn``,
``fastunlearn.UnlearnConfig``, ``fastunlearn.UnlearnResult`` and ``fastunlearn.UnlearnTrainer``.
"""
