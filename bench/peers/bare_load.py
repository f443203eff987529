"""Time a bare load of one checkpoint in this fresh process: `TransformersLoader().load`,
`validate`, `warmup`, nothing else (no server, no reloader). Prints one JSON line.

    python bench/peers/bare_load.py MODEL_DIR

Imports (torch, transformers, hotweights) are timed apart and not counted in `total_s`:
what a reload saves over a restart is the subject of another figure. A second load in the
same process (`repeat_total_s`) shows how much of the first was one-time cost.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    began = time.perf_counter()
    import torch  # noqa: F401  (imported before the clock starts)
    import transformers  # noqa: F401

    from hotweights.backends import TransformersLoader

    imported = time.perf_counter()
    source = sys.argv[1]
    timings: dict[str, float] = {"import_s": imported - began}
    for attempt in ("", "repeat_"):
        loader = TransformersLoader()
        t0 = time.perf_counter()
        model = loader.load(source)
        t1 = time.perf_counter()
        loader.validate(model)
        t2 = time.perf_counter()
        loader.warmup(model)
        t3 = time.perf_counter()
        loader.unload(model)
        timings |= {
            f"{attempt}load_s": t1 - t0,
            f"{attempt}validate_s": t2 - t1,
            f"{attempt}warmup_s": t3 - t2,
            f"{attempt}total_s": t3 - t0,
        }
    print(json.dumps({key: round(value, 4) for key, value in timings.items()}))


if __name__ == "__main__":
    main()
