"""Prompt sets: world / txt / jsonl / folder sources, held-out splits, index draws, bad input."""
import numpy as np
import pytest

from euphonium_jax.data import prompts as prompts_lib
from euphonium_jax.data import world
from euphonium_jax.data.prompts import PromptError


def _write(path, text):
  path.write_bytes(text.encode() if isinstance(text, str) else text)
  return str(path)


# --- sources ---------------------------------------------------------------------------------

def test_world():
  ps = prompts_lib.load("world")
  assert ps.is_world and ps.source == "world"
  assert ps.train == tuple(world.captions(world.combos("train")))
  assert ps.test == tuple(world.captions(world.combos("heldout")))
  assert (len(ps.train), len(ps.test)) == (len(world.combos("train")), len(world.combos("heldout")))
  assert ps.train_meta == ({},) * len(ps.train)
  assert ps.split("heldout") == ps.split("test") == (ps.test, ps.test_meta)
  assert ps.split("train") == (ps.train, ps.train_meta)


def test_txt_strips_and_skips_blank_lines(tmp_path):
  lines = [f"prompt {i}" for i in range(20)]
  path = _write(tmp_path / "p.txt", "\ufeff  " + "\r\n\n   \n".join(lines) + "\n\n")
  ps = prompts_lib.load(path, seed=0, test_fraction=0.25)
  assert not ps.is_world and ps.source == path
  assert (len(ps.train), len(ps.test)) == (15, 5)
  assert sorted(ps.train + ps.test) == sorted(lines)
  assert ps.train_meta == ({},) * 15 and ps.test_meta == ({},) * 5
  # Each split keeps file order.
  assert list(ps.train) == [p for p in lines if p in ps.train]


def test_jsonl_keeps_metadata(tmp_path):
  rows = ['{"prompt": " a cat ", "id": 1, "tags": ["x"]}', "", '{"id": 2, "prompt": "a dog"}',
          '{"prompt": "a \\u00e9l\\u00e8ve", "id": 3}', '{"prompt": "a fox", "id": 4}']
  folder = tmp_path / "ds"
  folder.mkdir()
  _write(folder / "train.jsonl", "\n".join(rows))
  _write(folder / "test.txt", "held one\n\nheld two\n")
  ps = prompts_lib.load(str(folder))
  assert ps.source == str(folder)
  assert ps.train == ("a cat", "a dog", "a élève", "a fox")
  assert ps.train_meta == ({"id": 1, "tags": ["x"]}, {"id": 2}, {"id": 3}, {"id": 4})
  assert ps.test == ("held one", "held two") and ps.test_meta == ({}, {})


def test_folder_train_and_test_txt(tmp_path):
  _write(tmp_path / "train.txt", "a\nb\nc\n")
  _write(tmp_path / "test.txt", "d\ne\n")
  _write(tmp_path / "README.md", "ignored")
  ps = prompts_lib.load(str(tmp_path), test_fraction=0.5)  # fraction unused with a test file
  assert (ps.train, ps.test) == (("a", "b", "c"), ("d", "e"))


def test_relative_and_home_paths(tmp_path, monkeypatch):
  _write(tmp_path / "p.txt", "a\nb\n")
  monkeypatch.chdir(tmp_path)
  assert prompts_lib.load("p.txt").source == str(tmp_path / "p.txt")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert prompts_lib.load("~/p.txt").source == str(tmp_path / "p.txt")


def test_folder_train_only_fraction_split(tmp_path):
  lines = [f"p{i:03d}" for i in range(200)]
  _write(tmp_path / "train.txt", "\n".join(lines))
  a = prompts_lib.load(str(tmp_path), seed=3, test_fraction=0.1)
  b = prompts_lib.load(str(tmp_path), seed=3, test_fraction=0.1)
  c = prompts_lib.load(str(tmp_path), seed=4, test_fraction=0.1)
  assert (a.train, a.test) == (b.train, b.test)  # deterministic in the seed
  assert a.test != c.test  # other seeds hold out other prompts
  for ps in (a, c):
    assert len(ps.test) == 20 and len(ps.train) == 180
    assert not set(ps.train) & set(ps.test)  # disjoint
    assert sorted(ps.train + ps.test) == lines  # covering
  assert a.fingerprint() == b.fingerprint() != c.fingerprint()
  assert len(a.fingerprint()) == 16 and a.fingerprint("train") != a.fingerprint("test")


def test_tiny_sets_keep_a_prompt_in_each_split(tmp_path):
  for n, fraction in ((2, 0.01), (2, 0.99), (3, 0.5)):
    path = _write(tmp_path / f"p{n}.txt", "\n".join(f"x{i}" for i in range(n)))
    ps = prompts_lib.load(path, test_fraction=fraction)
    assert len(ps.test) >= 1 and len(ps.train) >= 1 and len(ps.train) + len(ps.test) == n


def test_large_set_is_cheap(tmp_path):
  path = _write(tmp_path / "big.txt", "\n".join(f"prompt number {i}" for i in range(100_000)))
  ps = prompts_lib.load(path)
  assert (len(ps.train), len(ps.test)) == (90_000, 10_000)
  assert "train=90000" in repr(ps)


# --- iteration and evaluation indices --------------------------------------------------------

def test_iteration_indices_deterministic_and_seeded():
  a = prompts_lib.iteration_indices(50, 8, seed=1, iteration=7)
  assert a.dtype == np.int32 and a.shape == (8,)
  np.testing.assert_array_equal(a, prompts_lib.iteration_indices(50, 8, seed=1, iteration=7))
  assert not np.array_equal(a, prompts_lib.iteration_indices(50, 8, seed=2, iteration=7))
  assert not np.array_equal(a, prompts_lib.iteration_indices(50, 8, seed=1, iteration=8))
  # A far iteration costs only the epochs it touches, and is still a valid draw.
  far = prompts_lib.iteration_indices(50, 8, seed=1, iteration=10**9)
  assert far.shape == (8,) and len(set(far.tolist())) == 8 and far.max() < 50


def test_iteration_indices_epoch_coverage():
  num, n = 48, 8
  for epoch in range(3):
    draws = np.concatenate([prompts_lib.iteration_indices(num, n, seed=0, iteration=i)
                            for i in range(epoch * num // n, (epoch + 1) * num // n)])
    np.testing.assert_array_equal(np.sort(draws), np.arange(num))
  # Epochs are different permutations, and an iteration can straddle two epochs.
  e0 = np.concatenate([prompts_lib.iteration_indices(num, n, 0, i) for i in range(6)])
  e1 = np.concatenate([prompts_lib.iteration_indices(num, n, 0, i) for i in range(6, 12)])
  assert not np.array_equal(e0, e1)
  stream = np.concatenate([e0, e1])
  np.testing.assert_array_equal(prompts_lib.iteration_indices(num, 20, 0, 2), stream[40:60])


def test_iteration_indices_more_than_the_set():
  idx = prompts_lib.iteration_indices(5, 12, seed=0, iteration=0)
  assert idx.shape == (12,)
  np.testing.assert_array_equal(np.sort(idx[:5]), np.arange(5))  # epoch 0
  np.testing.assert_array_equal(np.sort(idx[5:10]), np.arange(5))  # epoch 1
  stream = np.concatenate([prompts_lib.iteration_indices(5, 12, 0, i) for i in range(5)])
  np.testing.assert_array_equal(np.bincount(stream), np.full(5, 12))  # 60 draws, 12 epochs
  np.testing.assert_array_equal(prompts_lib.iteration_indices(1, 3, 0, 4), [0, 0, 0])


def test_eval_indices():
  idx = prompts_lib.eval_indices(100, 10, seed=0)
  assert idx.dtype == np.int32 and idx.shape == (10,) and len(set(idx.tolist())) == 10
  np.testing.assert_array_equal(idx, prompts_lib.eval_indices(100, 10, seed=0))
  assert not np.array_equal(idx, prompts_lib.eval_indices(100, 10, seed=1))
  np.testing.assert_array_equal(prompts_lib.eval_indices(100, 3, 0), idx[:3])  # a prefix
  np.testing.assert_array_equal(prompts_lib.eval_indices(7, 7, 5), np.arange(7))
  np.testing.assert_array_equal(prompts_lib.eval_indices(7, 50, 5), np.arange(7))


def test_bad_index_arguments():
  with pytest.raises(ValueError, match="num_prompts must be an int >= 1, got 0"):
    prompts_lib.iteration_indices(0, 4, 0, 0)
  with pytest.raises(ValueError, match="iteration must be an int >= 0, got -1"):
    prompts_lib.iteration_indices(4, 4, 0, -1)
  with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
    prompts_lib.eval_indices(4, 0, 0)


# --- bad input -------------------------------------------------------------------------------

def _error(spec, **kwargs) -> str:
  with pytest.raises(PromptError) as info:
    prompts_lib.load(spec, **kwargs)
  return str(info.value)


def test_missing_path(tmp_path):
  msg = _error(str(tmp_path / "nope.txt"))
  assert f"{tmp_path / 'nope.txt'}: does not exist" in msg and "'world'" in msg


def test_wrong_extension(tmp_path):
  msg = _error(_write(tmp_path / "p.json", '{"prompt": "x"}'))
  assert f"{tmp_path / 'p.json'}: a file ending in '.json'" in msg
  assert ".txt file" in msg and ".jsonl file" in msg and "folder" in msg


@pytest.mark.parametrize("name,text", [("e.txt", ""), ("b.txt", "\n  \n\t\n"), ("e.jsonl", "\n\n")])
def test_empty_file(tmp_path, name, text):
  msg = _error(_write(tmp_path / name, text))
  assert f"{tmp_path / name}: no prompts" in msg and "at least one" in msg


def test_not_utf8_names_the_line(tmp_path):
  path = _write(tmp_path / "p.txt", b"ok one\nok two\nbad \xff here\nok\n")
  msg = _error(path)
  assert f"{path}:3: byte b'\\xff' at column 5 is not UTF-8" in msg


def test_jsonl_line_not_json(tmp_path):
  path = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",,}\n')
  msg = _error(path)
  assert f"{path}:3: not valid JSON" in msg and "one JSON object" in msg


def test_jsonl_line_not_an_object(tmp_path):
  path = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n["a", "b"]\n')
  assert f"{path}:2: is a JSON list" in _error(path)


def test_jsonl_line_without_prompt(tmp_path):
  path = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"text": "b", "id": 2}\n')
  msg = _error(path)
  assert f"{path}:2: has no 'prompt' field (fields: ['id', 'text'])" in msg


@pytest.mark.parametrize("value,problem", [("3", "'prompt' has type int (3)"),
                                           ("null", "'prompt' has type NoneType"),
                                           ('"  "', "'prompt' is empty")])
def test_jsonl_bad_prompt_value(tmp_path, value, problem):
  path = _write(tmp_path / "p.jsonl", f'{{"prompt": "a"}}\n{{"prompt": {value}}}\n')
  msg = _error(path)
  assert f"{path}:2: {problem}" in msg and "non-empty string" in msg


def test_folder_without_train_file(tmp_path):
  _write(tmp_path / "test.txt", "a\n")
  _write(tmp_path / "prompts.csv", "a\n")
  msg = _error(str(tmp_path))
  assert (f"{tmp_path}: folder has no train.txt or train.jsonl "
          f"(it holds: prompts.csv, test.txt)") in msg


def test_folder_with_both_train_files(tmp_path):
  _write(tmp_path / "train.txt", "a\n")
  _write(tmp_path / "train.jsonl", '{"prompt": "a"}\n')
  msg = _error(str(tmp_path))
  assert f"{tmp_path}: holds both train.txt and train.jsonl" in msg and "ambiguous" in msg


def test_error_in_folder_test_file_names_it(tmp_path):
  _write(tmp_path / "train.txt", "a\nb\n")
  path = _write(tmp_path / "test.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n')
  assert f"{path}:2: 'prompt' is empty" in _error(str(tmp_path))


def test_single_prompt_without_test_file_is_refused(tmp_path):
  path = _write(tmp_path / "one.txt", "only prompt\n")
  msg = _error(path)
  assert f"{path}: has 1 prompt and no test file" in msg and "at least 2 prompts" in msg
  folder = tmp_path / "f"
  folder.mkdir()
  _write(folder / "train.txt", "only\n")
  assert f"{folder / 'train.txt'}: has 1 prompt" in _error(str(folder))
  _write(folder / "test.txt", "held\n")
  assert prompts_lib.load(str(folder)).test == ("held",)  # a test file makes one prompt fine


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, True, "0.1"])
def test_bad_test_fraction(tmp_path, fraction):
  path = _write(tmp_path / "p.txt", "a\nb\n")
  msg = _error(path, test_fraction=fraction)
  assert f"test_fraction = {fraction!r} is invalid" in msg and "in (0, 1)" in msg


def test_bad_split_name():
  ps = prompts_lib.load("world")
  with pytest.raises(PromptError, match=r"world: split 'eval' is not one of \('train', 'test', "):
    ps.split("eval")


def test_meta_length_checked():
  with pytest.raises(ValueError, match="2 train prompts but 1 train_meta"):
    prompts_lib.PromptSet("x", ("a", "b"), (), ({},), ())
