"""The Colab quickstart notebook, executed headlessly on CPU on the tiny world (nbclient).

Parameters are injected papermill-style: a cell tagged `injected-parameters` right after the
cell tagged `parameters` (no papermill needed). The kernel runs in the repository root and
inherits this process's environment: JAX on CPU with the 8 forced devices of conftest.py.
"""

import base64
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "colab_tpu_quickstart.ipynb")


def inject_parameters(nb, params: dict) -> None:
  """Puts `params` in a cell after the `parameters` cell (replacing an earlier injection)."""
  tagged = lambda cell, tag: tag in cell.get("metadata", {}).get("tags", [])
  nb.cells = [c for c in nb.cells if not tagged(c, "injected-parameters")]
  index = next(i for i, c in enumerate(nb.cells) if tagged(c, "parameters"))
  source = "# Parameters injected by tests/test_notebook.py\n" + "".join(
      f"{k} = {v!r}\n" for k, v in params.items())
  cell = nbformat.v4.new_code_cell(source, id="injected-parameters")
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)


def output_mime_types(nb) -> dict[str, int]:
  counts = {}
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      for mime in out.get("data", {}):
        counts[mime] = counts.get(mime, 0) + 1
  return counts


def test_notebook_is_clean_and_parameterised():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "commit it unexecuted"
  params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  for name in ("REPO_URL", "INSTALL", "CONFIG", "ITERATIONS", "WORKDIR", "TINY"):
    assert f"{name} = " in params[0].source, name


@pytest.mark.slow
def test_notebook_runs_on_the_tiny_world(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = str(tmp_path / "work")
  inject_parameters(nb, dict(INSTALL=False, REPO_DIR=REPO, TINY=True, WORKDIR=workdir,
                             ITERATIONS=2, CUSTOM_ITERATIONS=1))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  try:
    client.execute(env=env)
  finally:
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # for a look after a failure

  # The main run: evaluation videos before (iteration 0) and after (iteration 2), the curves.
  grpo = os.path.join(workdir, "euphonium", "grpo")
  for name in ("iter_00000.gif", "iter_00000_frames.png", "iter_00000_scores.json",
               "iter_00002.gif", "iter_00002_frames.png"):
    assert os.path.getsize(os.path.join(grpo, "eval", name)) > 0, name
  assert os.path.getsize(os.path.join(grpo, "curves.png")) > 0
  # The custom config with the notebook's registered reward ran and logged that reward.
  from euphonium_jax import report
  rows = report.read_metrics(os.path.join(workdir, "custom"), "grpo")
  assert [r["step"] for r in rows] == [0, 1]
  assert 0.0 <= rows[1]["reward/my_reward"] <= 1.0

  # Displayed inline: the GIFs (before, after, custom) and the PNGs (contact sheets, plot).
  mimes = output_mime_types(nb)
  assert mimes.get("image/gif", 0) >= 3, mimes
  assert mimes.get("image/png", 0) >= 5, mimes
  gif = next(out.data["image/gif"] for c in nb.cells for out in c.get("outputs", [])
             if "image/gif" in out.get("data", {}))
  assert base64.b64decode(gif)[:6] in (b"GIF87a", b"GIF89a")
  errors = [out for c in nb.cells for out in c.get("outputs", []) if out.output_type == "error"]
  assert not errors
