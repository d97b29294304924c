"""Validation perplexity of simple n-gram baselines, next to a model's, on the same tokens.

Unigram (add-one) and interpolated Kneser-Ney bigram (absolute discount 0.75) are fitted on the training
files' token stream; every validation token after the first is scored, as `optlm eval` scores them
(``</s>`` before each document, as in training). With ``--model`` the model's sliding-window perplexity
on the identical stream is printed too, so the rows compare like with like.

    python benchmarks/baseline_ppl.py --tokenizer optlm/assets/opt-gutenberg \\
        --train <training books> --val <validation books> --model optlm/assets/opt-gutenberg
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np


def encode(files: list[str], tokenizer, unwrap: bool = False) -> np.ndarray:
    from optlm.evaluate import encode_file

    return np.concatenate([encode_file(f, tokenizer, unwrap=unwrap) for f in files])


def unigram_nll(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    return float(-logp[val[1:]].mean())


def kneser_ney_bigram_nll(train: np.ndarray, val: np.ndarray, vocab: int, d: float = 0.75) -> float:
    """Interpolated Kneser-Ney: P(w|v) = max(c(v,w) - d, 0)/c(v) + d·N1+(v·)/c(v) · P_cont(w)."""
    prev, nxt = train[:-1].astype(np.int64), train[1:].astype(np.int64)
    pairs, pair_counts = np.unique(prev * vocab + nxt, return_counts=True)
    p_v, p_w = pairs // vocab, pairs % vocab
    c_v = np.bincount(prev, minlength=vocab).astype(np.float64)          # c(v ·)
    types_after = np.bincount(p_v, minlength=vocab).astype(np.float64)   # N1+(v ·)
    types_before = np.bincount(p_w, minlength=vocab).astype(np.float64)  # N1+(· w)
    # Continuation probability, with a small floor so tokens never seen after anything stay finite.
    p_cont = (types_before + 0.5) / (types_before.sum() + 0.5 * vocab)
    v_prev, v_next = val[:-1].astype(np.int64), val[1:].astype(np.int64)
    idx = np.searchsorted(pairs, v_prev * vocab + v_next)
    idx = np.minimum(idx, len(pairs) - 1)
    c_vw = np.where(pairs[idx] == v_prev * vocab + v_next, pair_counts[idx], 0).astype(np.float64)
    cv = c_v[v_prev]
    seen = cv > 0
    p = np.where(seen, np.maximum(c_vw - d, 0) / np.maximum(cv, 1) + d * types_after[v_prev] / np.maximum(cv, 1)
                 * p_cont[v_next], p_cont[v_next])
    return float(-np.log(p).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="tokenizer directory")
    ap.add_argument("--train", nargs="+", required=True, help="training text files")
    ap.add_argument("--val", nargs="+", required=True, help="validation text files")
    ap.add_argument("--model", help="a checkpoint to score on the same tokens")
    ap.add_argument("--stride", type=int, default=256, help="sliding-window stride for the model")
    ap.add_argument("--unwrap", action="store_true", help="join hard-wrapped lines into paragraphs first")
    args = ap.parse_args()

    from optlm.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.tokenizer)
    train, val = encode(args.train, tok, args.unwrap), encode(args.val, tok, args.unwrap)
    vocab = len(tok)
    from optlm.data import iter_documents

    # Bits per character compare models whose tokenizers (or text preparation) differ: total nll / characters.
    chars = sum(len(piece) for f in args.val for piece, _ in iter_documents(f, unwrapped=args.unwrap))
    print(f"train tokens: {len(train):,}   validation tokens scored: {len(val) - 1:,}   characters: {chars:,}   "
          f"vocab: {vocab}")
    print(f"{'model':<34}{'val ppl':>10}{'nll/token':>11}{'bits/char':>11}")

    def bits_per_char(nll: float) -> float:
        return nll * (len(val) - 1) / chars / math.log(2)

    for name, nll in [("unigram (add-one)", unigram_nll(train, val, vocab)),
                      ("bigram (interpolated Kneser-Ney)", kneser_ney_bigram_nll(train, val, vocab))]:
        print(f"{name:<34}{math.exp(nll):>10.2f}{nll:>11.4f}{bits_per_char(nll):>11.4f}")
    if args.model:
        from optlm import OPTForCausalLM
        from optlm.evaluate import perplexity

        model = OPTForCausalLM.from_pretrained(args.model, dtype="float32")
        t0 = time.perf_counter()
        r = perplexity(model, val, stride=args.stride, batch_size=8)
        print(f"{'model (stride ' + str(args.stride) + ')':<34}{r.perplexity:>10.2f}{r.nll:>11.4f}"
              f"{bits_per_char(r.nll):>11.4f}   ({r.tokens:,} tokens, {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
