"""`alpamayo-jax serve`: one warm model behind AlpaSim's egodriver gRPC contract and a NIM-style
HTTP API.

    command.py   the command line (`add_arguments`, `main`)
    server.py    lifecycle: HTTP up, model loaded, warm-up, egodriver up, signals, clean stop
    worker.py    the one inference thread: a FIFO queue of jobs, and the warm-up
    alpasim.py   the egodriver policy (carla-driver-interface's `BaseDriver`) and its gRPC server
    http.py      the FastAPI app: /v1/infer, health, models, metrics
    nim.py       NIM's /v1/infer trajectory request and response
    state.py     what the endpoints share (model, worker, defaults, readiness)
    cameras.py   the model's camera ids, the names clients may use, `--camera-map`
    poses.py     quaternions and the 16-pose ego history in the t0 frame (numpy)
    images.py    JPEG / PNG bytes and base64 strings to RGB arrays
    metrics.py   counters and histograms in Prometheus' text format
    dependencies.py  the `serve` extra, imported only when serving

Only `command.add_arguments` and the pure-numpy modules import without the `serve` extra
(`pip install 'alpamayo-jax[serve]'`); the others say so when it is missing.
"""
