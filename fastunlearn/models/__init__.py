"""Models as fastunlearn meets them: loading and checking, 4- and 8-bit bases included (:mod:`.loading`),
names under wrappers (:mod:`.naming`), devices, threads and precision (:mod:`.devices`), and the losses
computed inside a causal LM's own forward (:mod:`.patching`)."""
