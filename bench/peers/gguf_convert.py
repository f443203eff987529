"""Run llama.cpp's `convert_hf_to_gguf.py` on a hotweights tiny model.

    python gguf_convert.py LLAMA_CPP_DIR MODEL_DIR OUT.gguf

The converter names a BPE tokenizer's pre-tokenizer by hashing how it encodes a fixed
text, and refuses tokenizers whose hash it does not know. The tiny models' tokenizer
(`hotweights.demo.tinylm.build_tokenizer`) is byte-level BPE with no merges and no regex
split, so it is unknown; but with no merges every byte is its own token however the text
is split, so llama.cpp's GPT-2 pre-tokenizer encodes it the same. This wrapper tells the
converter so, at run time, only where the hash is unknown; the vendored source is not
touched. Runs under the project's interpreter (torch, transformers, numpy, pyyaml).

llama.cpp also refuses a BPE vocabulary without a merges list, and the GGUF writer refuses
to write an empty one. So a tokenizer with no merges gets one inert merge, `ĀĀ ĀĀ`: its
left side is two U+0100 symbols (byte 0x00) joined, which only a merge could make, and no
merge makes it, so it can never apply and the encoding stays byte for byte.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

INERT_MERGE = "\u0100\u0100 \u0100\u0100"


def main() -> None:
    source, model, out = (Path(arg) for arg in sys.argv[1:4])
    sys.path[:0] = [str(source), str(source / "gguf-py")]
    from conversion.base import TextModel  # type: ignore[import-not-found]

    recognise = TextModel.get_vocab_base_pre

    def gpt2_when_unknown(self: Any, tokenizer: Any) -> str:
        try:
            name: str = recognise(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"
        return name

    TextModel.get_vocab_base_pre = gpt2_when_unknown

    from gguf.vocab import SpecialVocab  # type: ignore[import-not-found]

    write_vocab = SpecialVocab.add_to_gguf

    def with_a_merge(self: Any, writer: Any, quiet: bool = False) -> None:
        if self.load_merges and not self.merges:
            self.merges = [INERT_MERGE]
        write_vocab(self, writer, quiet)

    SpecialVocab.add_to_gguf = with_a_merge
    sys.argv = [str(source / "convert_hf_to_gguf.py"), str(model), "--outfile", str(out),
                "--outtype", "f32"]  # fmt: skip
    runpy.run_path(str(source / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
