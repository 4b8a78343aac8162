"""LitServe serving a sentence-transformers folder: ``encode`` inside, with dynamic batching.

    .venv-peers/bin/python benchmarks/peer_servers/litserve_encode.py MODEL_DIR PORT [DTYPE]

Run by benchmarks/peers.py in the peers' own environment (scripts/setup_peers.sh). POST
``/predict`` with ``{"input": "text"}`` answers ``{"embedding": [...]}``.
"""

from __future__ import annotations

import sys

import litserve as ls
import torch
from sentence_transformers import SentenceTransformer


class EncodeAPI(ls.LitAPI):
    def __init__(self, model_dir: str, dtype: str) -> None:
        super().__init__(max_batch_size=16, batch_timeout=0.005)
        self.model_dir = model_dir
        self.dtype = getattr(torch, dtype)

    def setup(self, device: str) -> None:
        self.model = SentenceTransformer(
            self.model_dir, device="cpu", model_kwargs={"torch_dtype": self.dtype}
        )

    def decode_request(self, request: dict) -> str:
        return request["input"]

    def predict(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, batch_size=16, normalize_embeddings=True).tolist()

    def encode_response(self, embedding: list[float]) -> dict:
        return {"embedding": embedding}


if __name__ == "__main__":
    model_dir, port = sys.argv[1], int(sys.argv[2])
    dtype = sys.argv[3] if len(sys.argv) > 3 else "float32"
    server = ls.LitServer(EncodeAPI(model_dir, dtype), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=port, generate_client_file=False)
