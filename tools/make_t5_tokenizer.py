"""Extract the T5 v1.1 tokenizer (tokenizer.json) that FLUX.1's T5-XXL text encoder reads from
stable-diffusion.cpp's embedded copy, as shipped in the stable-diffusion-cpp-python sdist.

FLUX.1 tokenizes its long prompt with google/t5-v1_1-xxl's SentencePiece unigram model (32000 pieces + 100
`<extra_id_N>`; Apache-2.0). Rather than committing a file downloaded from the hub, we take the
tokenizer.json that stable-diffusion.cpp (MIT) compiles in as the C array `t5_tokenizer_json_str` of
src/tokenizers/vocab/clip_t5.hpp, so anyone can regenerate and diff it:

    python tools/make_t5_tokenizer.py stable_diffusion_cpp_python-0.4.7.tar.gz \
        lora_scripts/models/assets/t5_tokenizer

The sdist is the release's source file on PyPI (https://pypi.org/project/stable-diffusion-cpp-python/0.4.7/
#files); `pip download stable-diffusion-cpp-python==0.4.7 --no-deps --no-binary :all:` fetches it too, though
pip may then stop while preparing the package's build metadata. The checked-in file is byte-identical to this
tool's output. The output is tokenizer.json only; tokenizer_config.json and
special_tokens_map.json in that folder are small hand-written files (pad <pad>, eos </s>, unk <unk>, 100 extra
ids, model_max_length 512).
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

HEADER_SUFFIX = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
ARRAY_NAME = "t5_tokenizer_json_str"
NUM_PIECES = 32100  # 32000 SentencePiece pieces + 100 <extra_id_N>


def read_header(sdist: Path) -> str:
    """The text of clip_t5.hpp inside the sdist (a .tar.gz)."""
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            if member.name.endswith(HEADER_SUFFIX):
                handle = archive.extractfile(member)
                if handle is not None:
                    return handle.read().decode("utf-8")
    raise SystemExit(f"{sdist}: no {HEADER_SUFFIX} inside; is it the stable-diffusion-cpp-python sdist?")


def extract_array(header: str, name: str = ARRAY_NAME) -> bytes:
    """The bytes of `static const unsigned char NAME[] = { 0x7b, 0x0a, ... };` (a trailing NUL is dropped)."""
    match = re.search(rf"\b{re.escape(name)}\s*\[\s*\]\s*=\s*\{{(.*?)\}};", header, re.DOTALL)
    if match is None:
        raise SystemExit(f"no array '{name}' in the header")
    data = bytes(int(token, 0) for token in re.findall(r"0[xX][0-9a-fA-F]+|\d+", match.group(1)))
    return data.rstrip(b"\0")


def check_tokenizer_json(data: bytes) -> None:
    """A T5 unigram tokenizer.json with NUM_PIECES pieces and <pad>, </s>, <unk> at ids 0, 1, 2."""
    content = json.loads(data.decode("utf-8"))
    model = content.get("model", {})
    if model.get("type") != "Unigram" or len(model.get("vocab", [])) != NUM_PIECES:
        raise SystemExit(f"expected a Unigram model with {NUM_PIECES} pieces")
    if [piece for piece, _ in model["vocab"][:3]] != ["<pad>", "</s>", "<unk>"]:
        raise SystemExit("expected <pad>, </s>, <unk> as the first three pieces")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="stable_diffusion_cpp_python-0.4.7.tar.gz")
    parser.add_argument(
        "out_dir", type=Path, help="folder to write, e.g. lora_scripts/models/assets/t5_tokenizer"
    )
    args = parser.parse_args()
    data = extract_array(read_header(args.sdist))
    check_tokenizer_json(data)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "tokenizer.json").write_bytes(data)
    print(f"wrote {args.out_dir / 'tokenizer.json'} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
