"""Pretraining data: where text comes from (`corpus`, `fineweb`) and how it becomes batches (`loader`).

    corpus = open_corpus("fineweb" | "task" | "path/or/*.glob", task=task, skip_bad=False)
    corpus = open_run_corpus(cfg, task)         # data.corpus; for fineweb, data.fineweb_shards downloaded first
    loader = PackedLoader(corpus, tokenizer, batch_size=8, seq_len=256, seed=0, rank=0, world_size=1)
    x, y = next(loader)                         # LongTensors (B, T); y is x shifted by one token
    state = loader.state_dict(); loader.load_state_dict(state)   # exact resume

Nothing heavy is imported here: pyarrow and torch load inside the functions that use them.
"""

from nanorl.data.corpus import Corpus, open_corpus
from nanorl.data.fineweb import FINEWEB_URL, download_fineweb, fineweb_dir, fineweb_shards
from nanorl.data.loader import PackedLoader
from nanorl.data.prepare import fetch_fineweb, held_out_sample, open_run_corpus, tokenizer_dir, train_run_tokenizer

__all__ = [
    "Corpus",
    "open_corpus",
    "PackedLoader",
    "FINEWEB_URL",
    "download_fineweb",
    "fineweb_dir",
    "fineweb_shards",
    "fetch_fineweb",
    "open_run_corpus",
    "tokenizer_dir",
    "train_run_tokenizer",
    "held_out_sample",
]
