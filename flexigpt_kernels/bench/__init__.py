"""Benchmarks of the fused op and of whole pruned models, as a library behind `flexigpt bench`.

    shapes.py     the shape grid (decode / prefill rows at Llama-2-7B and SmolLM2 widths)
    formulas.py   flops, bytes and the floor factor: the stated formulas behind TFLOP/s, GB/s
    providers.py  what is timed side by side: ours per backend, PEFT-style unfused, dense
    timing.py     triton.testing.do_bench on CUDA; interleaved torch.utils.benchmark on CPU
    kernels.py    the kernel grid: runs providers per shape, derives floor and ratios
    model.py      end to end: dense vs drop vs ours vs the same weights composed unfused
    results.py    CSV (appended, tagged with device, versions, date, commit) and markdown
    plot.py       ratio-vs-M PNG plots from a kernels CSV (matplotlib, Agg)
    env.py        device names, versions, git commit, output locations

Nothing here touches a GPU at import time; heavy imports happen inside the functions.
"""
