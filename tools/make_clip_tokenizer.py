"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) from open_clip's bpe_simple_vocab_16e6.txt.gz.

SD 1.x and SD 2.x both tokenize with OpenAI CLIP's byte-level BPE. Rather than committing files downloaded
from the hub, we rebuild them from the BPE table that ships inside the open_clip_torch wheel, following
OpenAI's `SimpleTokenizer` exactly, so anyone can regenerate and diff them:

    python tools/make_clip_tokenizer.py open_clip_torch-3.3.0-py3-none-any.whl \
        lora_scripts/models/assets/clip_tokenizer

The output is what transformers' `CLIPTokenizer` reads: vocab.json (49408 entries), merges.txt (48894 merges
after a `#version: 0.2` header), tokenizer_config.json and special_tokens_map.json (SD 1.x flavour: pad token
`<|endoftext|>`; SD 2.x loads the same folder with `pad_token="!"`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# OpenAI keeps the first 49152 - 256 - 2 merges so that 256 bytes + 256 word-final bytes + merges + the two
# special tokens come to exactly 49408 ids (the text encoders' vocab_size).
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode table (256 entries, order matters: it fixes the ids)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(2**8):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(2**8 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def derive_vocab_and_merges(bpe_lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """Token -> id table and the merge list, from the lines of bpe_simple_vocab_16e6.txt.

    The first line is a header, so merges are lines[1 : NUM_MERGES + 1], as in OpenAI's SimpleTokenizer.
    """
    merges = bpe_lines[1 : NUM_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def _special(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(bpe_lines: list[str], out_dir: Path) -> None:
    """Write the four CLIPTokenizer files into `out_dir` (created if needed); the output is byte-stable."""
    vocab, merges = derive_vocab_and_merges(bpe_lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special_tokens = {
        "bos_token": _special(BOS),
        "eos_token": _special(EOS),
        "pad_token": EOS,
        "unk_token": _special(EOS),
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        **special_tokens,
    }
    for name, content in (
        ("special_tokens_map.json", special_tokens),
        ("tokenizer_config.json", tokenizer_config),
    ):
        (out_dir / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_bpe_lines(wheel: Path) -> list[str]:
    """The lines of the gzipped BPE table inside an open_clip_torch wheel (a zip file)."""
    with zipfile.ZipFile(wheel) as archive:
        return gzip.decompress(archive.read(BPE_MEMBER)).decode("utf-8").split("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="open_clip_torch-*.whl (any 2.x/3.x release)")
    parser.add_argument(
        "out_dir", type=Path, help="folder to write, e.g. lora_scripts/models/assets/clip_tokenizer"
    )
    args = parser.parse_args()
    write_tokenizer(read_bpe_lines(args.wheel), args.out_dir)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
