"""`imgfeat serve`: a local web page over a store (FastAPI + uvicorn, the `serve` extra)."""
