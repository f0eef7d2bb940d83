"""How a run is spread over devices: the process group, its collectives and ZeRO-3 partitioned parameters
(:mod:`.distributed`), FSDP2 (:mod:`.fsdp`) and DeepSpeed (:mod:`.deepspeed`)."""
