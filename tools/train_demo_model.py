"""Train the small Llama (GQA) demo model that ships with bawa-vllm.

The README's demo must run on a fresh machine with no model hub, so the project carries its own model:
a byte-level BPE tokenizer and a 4-block Llama with grouped-query attention, trained on English
Wikipedia summaries (CC BY-SA 4.0, see ``demo/README.md``). The run is deterministic (fixed seeds,
single-threaded data order, deterministic torch algorithms) and sized to finish in under 30 minutes
on 2 CPU cores.

    python tools/train_demo_model.py --data ../shared/data/wiki-summaries --out demo/model
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

logger = logging.getLogger("train_demo_model")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def _paragraphs(path: Path) -> list[str]:
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """A byte-level BPE tokenizer: no unknown characters, and small enough for a tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    # A chat template so that the OpenAI chat endpoint of a server can format messages.
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(out)
    return fast


def build_model(vocab_size: int, seqlen: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2 * seqlen,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seqlen: int) -> float:
    model.eval()
    n = data.numel() // seqlen
    windows = data[: n * seqlen].view(n, seqlen)
    nll = 0.0
    for i in range(0, n, 16):
        batch = windows[i : i + 16]
        nll += model(batch, labels=batch).loss.item() * batch.shape[0]
    model.train()
    return math.exp(nll / n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder with wiki.train.txt and wiki.valid.txt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    train_texts = _paragraphs(args.data / "wiki.train.txt")
    valid_texts = _paragraphs(args.data / "wiki.valid.txt")
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=args.out.parent if args.out.parent.exists() else None))
    try:
        tokenizer = train_tokenizer(train_texts, args.vocab_size, tmp)
        train = token_stream(tokenizer, train_texts)
        valid = token_stream(tokenizer, valid_texts)
        logger.info("tokens: train %d, valid %d", train.numel(), valid.numel())

        model = build_model(len(tokenizer), args.seqlen)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("parameters: %d", n_params)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
        warmup = args.steps // 20

        def lr_at(step: int) -> float:
            if step < warmup:
                return args.lr * (step + 1) / warmup
            progress = (step - warmup) / max(1, args.steps - warmup)
            return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

        gen = torch.Generator().manual_seed(args.seed)
        starts_max = train.numel() - args.seqlen - 1
        t0 = time.time()
        model.train()
        for step in tqdm(range(args.steps), desc="train", mininterval=10):
            starts = torch.randint(0, starts_max, (args.batch_size,), generator=gen)
            batch = torch.stack([train[s : s + args.seqlen] for s in starts.tolist()])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = model(batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 200 == 0 or step == args.steps - 1:
                logger.info("step %d loss %.3f (%.0f s)", step, loss.item(), time.time() - t0)

        ppl = evaluate(model, valid, args.seqlen)
        logger.info("validation perplexity (seqlen %d): %.2f", args.seqlen, ppl)
        model.config.use_cache = True
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        model.generation_config.save_pretrained(tmp)
        (tmp / "training.json").write_text(
            json.dumps(
                {
                    "parameters": n_params,
                    "steps": args.steps,
                    "batch_size": args.batch_size,
                    "seqlen": args.seqlen,
                    "lr": args.lr,
                    "seed": args.seed,
                    "train_tokens_seen": args.steps * args.batch_size * args.seqlen,
                    "valid_perplexity_fp32": ppl,
                    "seconds": time.time() - t0,
                },
                indent=2,
            )
        )
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.chmod(0o755)
        os.replace(tmp, args.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
