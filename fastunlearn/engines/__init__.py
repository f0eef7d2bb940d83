"""How a run is spread over devices: the process group and its collectives (:mod:`.distributed`),
ZeRO-3 partitioned parameters (:mod:`.sharded`), FSDP2 (:mod:`.fsdp`) and DeepSpeed (:mod:`.deepspeed`)."""
