"""Serving: one SAM 2 base with many adapters chosen per request, over HTTP (`sam2-peft serve`).

`app.create_app` builds the FastAPI app from a `ServeConfig`; `adapters.AdapterRegistry` keeps the adapters resident
on one base, `cache.ByteLRU` the image embeddings, `batching.MicroBatcher` groups concurrent decodes. The HTTP
packages come with the `serve` extra (`pip install "sam2-peft[serve]"`); nothing here imports them except `app`.
"""
