"""The packing loader: documents -> fixed-length rows of tokens -> (x, y) batches, resumable exactly.

How rows are made (deterministic for a seed):
1. The corpus is read in blocks of `block_docs * world_size` documents, in corpus order. Each block is shuffled
   with a generator seeded by (seed, epoch, block), and rank r takes every world_size-th document of it from
   position r: ranks see disjoint documents, so disjoint rows, and each rank tokenizes only its own share.
2. Each document becomes <|bos|> + its tokens (one batched, multi-threaded tiktoken call per block). A document
   longer than a row is cut into row-sized pieces.
3. Rows of seq_len + 1 tokens are packed best-fit: a row starts with the next document in shuffled order (so
   every row starts at a <|bos|>, except a long document's continuation), then takes the largest piece that
   still fits, again and again; when none fits, the shortest piece fills the row exactly and the rest of it goes
   back into the pool, to fill a later row. Unlike nanochat, which drops the cropped tails, no token is thrown
   away but a block's last, partial row (counted in `stats["dropped_tokens"]`): with short documents (the
   `arith` corpus, ~130 tokens in rows of 257) dropping tails loses ~27% of the corpus. The price: a tail sits
   after another document, without its own beginning in view, as in plain concatenation. No padding, so every
   target is a real token.
4. A batch is the next batch_size rows; x = row[:-1], y = row[1:]. After the last block the next epoch starts,
   with a new shuffle. In a small corpus a rank's share of a later epoch may give no row (only short
   documents dealt to it): that rank goes on to the next epoch, `MAX_EMPTY_EPOCHS` such epochs in a row are an
   error. The next block is tokenized and packed on a background thread while the current one is
   consumed (tiktoken releases the GIL), so the training loop rarely waits on it.

The state is (epoch, block, row within the block): a few integers. Resuming re-reads the corpus up to that block
(text only, no tokenizing) and rebuilds it, so the next batch after `load_state_dict` is exactly the one that
would have come next. Each rank has its own state; under DDP save every rank's (`load_state_dict` also accepts
the list of all ranks' states and picks its own).
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from nanorl.api import NanorlError
from nanorl.data.corpus import Corpus

# Documents per rank per block: large enough that best-fit finds good fits and the shuffle mixes well, small
# enough that a block tokenizes in well under a second (2048 FineWeb documents ~ 2M tokens).
BLOCK_DOCS = 2048
# Passes in a row that may give a rank no row (a small corpus, reshuffled each pass) before it is an error
MAX_EMPTY_EPOCHS = 10


class PackedLoader:
    def __init__(
        self,
        corpus: Corpus | Sequence[str] | Callable[[], Iterable[str]],
        tokenizer: Any,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: Any = "cpu",
        block_docs: int = BLOCK_DOCS,
        shuffle: bool = True,
        prefetch: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise NanorlError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or seq_len < 1 or block_docs < 1:
            raise NanorlError("batch_size, seq_len and block_docs must be positive", exit_code=2)
        self.corpus = corpus
        self.tok = tokenizer
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.block_docs = block_docs
        self.shuffle = shuffle
        self.prefetch = prefetch
        self.stats = {"tokens": 0, "dropped_tokens": 0, "docs": 0}
        # position: the next row to hand out is row `row` of block `block` of epoch `epoch`
        self.epoch = 0
        self.block = 0
        self.row = 0
        self._rows: np.ndarray | None = None  # the packed rows of (epoch, block), once built
        self._docs: Iterator[str] | None = None  # the corpus pass, positioned at block `_docs_block`
        self._docs_block = 0
        self._epoch_rows = 0  # rows produced so far in this epoch (an epoch with none: corpus too small)
        self._empty_epochs = 0  # passes in a row, up to the last one ended, that gave this rank no row
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[tuple[int, int], Future] | None = None  # the block being built in the background

    # -- the document stream ------------------------------------------------------------------------------
    def _new_pass(self) -> Iterator[str]:
        c = self.corpus
        if isinstance(c, Corpus):
            return c.docs()
        if callable(c):
            return iter(c())
        return iter(c)

    def _read_block(self, epoch: int, block: int) -> list[str] | None:
        """This rank's documents of block `block` in shuffled order; None after the corpus's last block."""
        if self._docs is None or self._docs_block > block:
            self._docs, self._docs_block = self._new_pass(), 0
        n = self.block_docs * self.world_size
        while self._docs_block < block:  # skip whole blocks (resume): read, don't tokenize
            for _ in range(n):
                if next(self._docs, None) is None:
                    self._docs = None  # spent: the next epoch's block 0 must start a fresh pass, not read this one
                    return None
            self._docs_block += 1
        docs = []
        for _ in range(n):
            d = next(self._docs, None)
            if d is None:
                break
            docs.append(d)
        self._docs_block += 1
        if not docs:
            if epoch == 0 and block == 0:
                raise NanorlError("the corpus has no documents")
            return None
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, block]).permutation(len(docs))
            docs = [docs[i] for i in order]
        return docs[self.rank :: self.world_size]

    # -- packing ------------------------------------------------------------------------------------------
    def _pack(self, docs: list[str]) -> tuple[np.ndarray, int]:
        """Rows of one block, and the tokens dropped (its last, partial row)."""
        L = self.seq_len + 1
        pieces: list[list[int]] = []
        for ids in self.tok.encode_batch(docs, bos=True):
            pieces.extend(ids[i : i + L] for i in range(0, len(ids), L))
        pool = sorted((len(p), i) for i, p in enumerate(pieces))  # best-fit lookups by length
        used = bytearray(len(pieces))
        rows: list[list[int]] = []
        dropped = 0
        nxt = 0
        while True:
            while nxt < len(pieces) and used[nxt]:
                nxt += 1
            if nxt == len(pieces):
                break
            row = list(pieces[nxt])
            used[nxt] = 1
            del pool[bisect_right(pool, (len(row), nxt)) - 1]
            while len(row) < L and pool:
                space = L - len(row)
                k = bisect_right(pool, (space, 1 << 62)) - 1
                if k >= 0:  # the largest piece that fits
                    _, i = pool.pop(k)
                    row += pieces[i]
                else:  # none fits: the shortest fills the row, and its tail goes back in the pool
                    _, i = pool.pop(0)
                    row += pieces[i][:space]
                    pieces.append(pieces[i][space:])
                    used.append(0)
                    insort(pool, (len(pieces[-1]), len(pieces) - 1))
                used[i] = 1
            if len(row) == L:
                rows.append(row)
            else:
                dropped += len(row)  # the block's last, partial row
        return np.array(rows, dtype=np.int64).reshape(-1, L), dropped

    def _build(self, epoch: int, block: int) -> tuple[np.ndarray, int, int] | None:
        """(rows, dropped tokens, documents) of a block, or None past the corpus's end. Runs on the prefetch
        thread, which alone touches the document stream."""
        docs = self._read_block(epoch, block)
        if docs is None:
            return None
        rows, dropped = self._pack(docs) if docs else (np.zeros((0, self.seq_len + 1), np.int64), 0)
        return rows, dropped, len(docs)

    def _submit(self, epoch: int, block: int) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanorl-loader")
        return self._pool.submit(self._build, epoch, block)

    def _current_rows(self) -> np.ndarray:
        """The rows of the current (epoch, block), moving to the next epoch after the last block.

        The next block is built on a background thread while this one is consumed (tokenizing and packing
        overlap training). Blocks depend only on (epoch, block), so prefetching changes no row."""
        while self._rows is None:
            key = (self.epoch, self.block)
            ahead = self._ahead if self._ahead is not None and self._ahead[0] == key else None
            built = (ahead[1] if ahead else self._submit(*key)).result()
            self._ahead = None
            if built is None:  # end of the corpus: next epoch
                self._empty_epochs = self._empty_epochs + 1 if self._epoch_rows == 0 else 0
                # The first pass must give this rank a row (`prepare` checks it before training). A later pass
                # may not, when the corpus is small: its shuffle can deal this rank only documents shorter than
                # a row. The rank then takes the next pass, as the others go on with theirs; only a share that
                # stays empty pass after pass is an error (met on this rank alone: the training loop makes
                # every rank raise it together).
                if self._empty_epochs and (self.epoch == 0 or self._empty_epochs >= MAX_EMPTY_EPOCHS):
                    passes = f" in {self._empty_epochs} passes in a row" if self.epoch else ""
                    raise NanorlError(
                        f"the corpus is too small: not one row of {self.seq_len + 1} tokens for rank {self.rank} of"
                        f" {self.world_size}{passes}",
                        hint="use a longer corpus, a shorter model.seq_len or fewer processes",
                    )
                self.epoch, self.block, self.row, self._epoch_rows = self.epoch + 1, 0, 0, 0
                continue
            rows, dropped, n_docs = built
            self.stats["docs"] += n_docs
            self.stats["dropped_tokens"] += dropped
            if self.prefetch:
                self._ahead = ((self.epoch, self.block + 1), self._submit(self.epoch, self.block + 1))
            if self.row >= len(rows):  # an empty block for this rank, or resumed at its end
                self.block, self.row = self.block + 1, 0
                continue
            self._rows = rows
            self._epoch_rows += len(rows)
        return self._rows

    def prepare(self) -> None:
        """Build the rows of the current position now, as the next batch would (no row is consumed): raises the
        "corpus too small" NanorlError here when this rank's share gives no row. Under torchrun every rank calls
        it before training and the ranks raise together (nanorl.stages.common.prepare_loader), where a rank
        meeting the error at its first batch alone would leave the others waiting in a collective."""
        self._current_rows()

    # -- batches --------------------------------------------------------------------------------------------
    def next_rows(self) -> np.ndarray:
        """The next batch_size rows (batch_size, seq_len + 1) as int64 numpy."""
        out = []
        need = self.batch_size
        while need:
            rows = self._current_rows()
            take = rows[self.row : self.row + need]
            out.append(take)
            need -= len(take)
            self.row += len(take)
            if self.row >= len(rows):
                self.block, self.row, self._rows = self.block + 1, 0, None
        batch = np.concatenate(out) if len(out) > 1 else out[0]
        self.stats["tokens"] += batch.size
        return batch

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self):
        import torch

        rows = torch.from_numpy(self.next_rows())
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if str(self.device).startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    # -- resume -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "block": self.block,
            "row": self.row,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "block_docs": self.block_docs,
        }

    def load_state_dict(self, state: dict[str, int] | list[dict[str, int]]) -> None:
        """Restore a position saved by `state_dict` (or pick this rank's from a list of every rank's)."""
        if isinstance(state, list):
            mine = [s for s in state if s.get("rank") == self.rank]
            if len(mine) != 1:
                raise NanorlError(f"the saved loader states have no single entry for rank {self.rank}")
            state = mine[0]
        for key in ("seed", "world_size", "seq_len", "block_docs", "rank"):
            if state.get(key) != getattr(self, key):
                raise NanorlError(
                    f"cannot resume the data loader: {key} was {state.get(key)}, now {getattr(self, key)}",
                    hint="resume with the same seed, number of processes and sequence length",
                )
        if self._ahead is not None:  # let the background build finish before the stream is reset under it
            self._ahead[1].exception()
            self._ahead = None
        self.epoch, self.block, self.row = int(state["epoch"]), int(state["block"]), int(state["row"])
        # rows already came out of this epoch before the save when the position is past its start
        self._rows, self._docs, self._epoch_rows = None, None, self.block + self.row
        self._empty_epochs = 0
