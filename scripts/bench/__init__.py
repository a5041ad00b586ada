"""The measurements of ``scripts/benchmark.py``, one module each: what each mode's step is
(:mod:`.modes`), its time (:mod:`.step_time`), its peak memory (:mod:`.memory`), where the
cakd step's extra time goes (:mod:`.profiling`), its arithmetic (:mod:`.flops`), and the data
loader's throughput (:mod:`.loader`)."""
