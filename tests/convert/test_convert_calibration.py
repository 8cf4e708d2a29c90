import json

import pytest
import torch

from flexigpt_kernels.convert import calibration
from flexigpt_kernels.convert.calibration import token_batches

EOS = 1


def ids(words):  # the word tokenizer maps w<i> to i + 2
    return [int(w[1:]) + 2 for w in words.split()]


DOCS = ["w1 w2 w3", "w4 w5", "", "w6 w7 w8 w9", "w10 w11 w12"]
# documents joined with EOS, blank document skipped
STREAM = ids(DOCS[0]) + [EOS] + ids(DOCS[1]) + [EOS] + ids(DOCS[3]) + [EOS] + ids(DOCS[4])


def test_list_of_strings_in_order(word_tokenizer):
    out = token_batches(DOCS, word_tokenizer, seq_len=4, num_samples=3, seed=None)
    assert out.dtype == torch.long and out.shape == (3, 4)
    assert out.flatten().tolist() == STREAM[:12]


def test_generator_and_dict_rows(word_tokenizer):
    gen = ({"body": d} for d in DOCS)
    out = token_batches(gen, word_tokenizer, seq_len=4, num_samples=3, text_field="body")
    assert out.flatten().tolist() == STREAM[:12]


def test_seed_shuffles_documents_deterministically(word_tokenizer):
    docs = [f"w{i} w{i + 50}" for i in range(40)]
    a = token_batches(docs, word_tokenizer, seq_len=6, num_samples=5, seed=3)
    b = token_batches(docs, word_tokenizer, seq_len=6, num_samples=5, seed=3)
    plain = token_batches(docs, word_tokenizer, seq_len=6, num_samples=5, seed=None)
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert docs[0] == "w0 w50"  # the caller's list is not shuffled in place


def test_txt_file_one_document_per_line(word_tokenizer, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(DOCS) + "\n")
    out = token_batches(path, word_tokenizer, seq_len=4, num_samples=3, seed=None)
    assert out.flatten().tolist() == STREAM[:12]
    same = token_batches(str(path), word_tokenizer, seq_len=4, num_samples=3, seed=None)
    assert torch.equal(out, same)


def test_jsonl_file_and_text_field(word_tokenizer, tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    out = token_batches(path, word_tokenizer, seq_len=4, num_samples=3, seed=None, text_field="content")
    assert out.flatten().tolist() == STREAM[:12]
    with pytest.raises(ValueError, match=r"text_field: 'text'.*\['content', 'id'\]"):
        token_batches(path, word_tokenizer, seq_len=4, num_samples=3)


def test_parquet_file(word_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "calib.parquet"
    pq.write_table(pa.table({"text": DOCS}), path)
    out = token_batches(path, word_tokenizer, seq_len=4, num_samples=3, seed=None)
    assert out.flatten().tolist() == STREAM[:12]


def test_folder_of_mixed_files(word_tokenizer, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("w1 w2 w3\nw4 w5\n")
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "w6 w7 w8 w9"}) + "\n")
    (tmp_path / "notes.md").write_text("w99 " * 100)  # not a calibration file: ignored
    out = token_batches(tmp_path, word_tokenizer, seq_len=3, num_samples=3, seed=None)
    assert out.flatten().tolist() == STREAM[:9]


def test_empty_folder_and_missing_path(word_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no .*files under"):
        token_batches(tmp_path, word_tokenizer)
    with pytest.raises(ValueError, match="no such file"):
        token_batches(str(tmp_path / "missing.jsonl"), word_tokenizer)
    (tmp_path / "x.csv").write_text("text\nw1\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        token_batches(tmp_path / "x.csv", word_tokenizer)


def test_not_enough_tokens_says_found_and_needed(word_tokenizer):
    with pytest.raises(ValueError, match=r"found 15, need 16"):
        token_batches(DOCS, word_tokenizer, seq_len=4, num_samples=4, seed=None)


def test_texts_need_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        token_batches(DOCS)
    with pytest.raises(ValueError, match="tokenizer"):
        token_batches(str(tmp_path / "missing.txt"))


def test_bad_arguments(word_tokenizer):
    with pytest.raises(ValueError, match="seq_len"):
        token_batches(DOCS, word_tokenizer, seq_len=0)
    with pytest.raises(ValueError, match="num_samples"):
        token_batches(DOCS, word_tokenizer, num_samples=2.5)
    with pytest.raises(ValueError, match="source"):
        token_batches(42, word_tokenizer)
    with pytest.raises(ValueError, match="source: expected strings"):
        token_batches([1, 2, 3], word_tokenizer, seed=None)


def test_token_tensor_sources(word_tokenizer):
    t = torch.arange(60).view(6, 10)
    assert torch.equal(token_batches(t, seq_len=4, num_samples=2), t[:2, :4])
    assert torch.equal(token_batches(t.int(), seq_len=None, num_samples=None), t)
    assert token_batches(t, seq_len=None, num_samples=None).dtype == torch.long
    stream = torch.arange(20)
    assert torch.equal(token_batches(stream, seq_len=5, num_samples=3), stream[:15].view(3, 5))
    with pytest.raises(ValueError, match=r"\(6, 10\) is smaller than.*seq_len=11"):
        token_batches(t, seq_len=11, num_samples=2)
    with pytest.raises(ValueError, match="num_samples=7"):
        token_batches(t, seq_len=4, num_samples=7)
    with pytest.raises(ValueError, match="integer tensor"):
        token_batches(t.float(), seq_len=4, num_samples=2)
    with pytest.raises(ValueError, match=">= 0"):
        token_batches(t - 1, seq_len=4, num_samples=2)
    with pytest.raises(ValueError, match="vocabulary"):
        token_batches(t + 100, word_tokenizer, seq_len=4, num_samples=2)
    with pytest.raises(ValueError, match="shape"):
        token_batches(t.view(2, 3, 10), seq_len=4, num_samples=2)


class _FakeStream:
    def __init__(self, rows):
        self.rows, self.shuffled = rows, None

    def shuffle(self, seed=None, buffer_size=None):
        self.shuffled = (seed, buffer_size)
        return self

    def __iter__(self):
        return iter(self.rows)


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls, streams = [], []

    def load_dataset(name, config=None, *, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if split == "validation" and name == "no-val":
            raise ValueError("Unknown split \"validation\". Should be one of ['train'].")
        if split == "bogus":
            raise ValueError("Unknown split \"bogus\". Should be one of ['train'].")
        streams.append(_FakeStream([{"text": d} for d in DOCS]))
        return streams[-1]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, streams


def test_hub_name_streams_validation_split(word_tokenizer, fake_hub):
    calls, streams = fake_hub
    out = token_batches("org/corpus", word_tokenizer, seq_len=4, num_samples=3, seed=None)
    assert out.flatten().tolist() == STREAM[:12]
    assert calls == [("org/corpus", None, "validation", True)]
    assert streams[0].shuffled is None


def test_hub_falls_back_to_train_and_config_syntax(word_tokenizer, fake_hub):
    calls, streams = fake_hub
    token_batches("no-val:en", word_tokenizer, seq_len=4, num_samples=3, seed=5)
    assert calls == [("no-val", "en", "validation", True), ("no-val", "en", "train", True)]
    assert streams[0].shuffled == (5, calibration._STREAM_SHUFFLE_BUFFER)


def test_hub_explicit_split_is_not_second_guessed(word_tokenizer, fake_hub):
    calls, _ = fake_hub
    token_batches("org/corpus", word_tokenizer, seq_len=4, num_samples=3, split="test")
    assert calls == [("org/corpus", None, "test", True)]
    with pytest.raises(ValueError, match="bogus"):
        token_batches("org/corpus", word_tokenizer, split="bogus")
