"""The notebooks: stored without outputs, and each runs top to bottom at
the runlocal size (a cell that raises fails the test)."""

import glob
import os

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
NAMES = [os.path.basename(p)[: -len(".ipynb")] for p in NOTEBOOKS]


def test_the_four_notebooks_exist():
  assert set(NAMES) >= {"quickstart", "ablate_tau", "length_penalty",
                        "paper_figures"}, NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs, f"{path} cell {i}: clear its outputs"
      assert cell.execution_count is None, f"{path} cell {i}"
  # the first code cell installs the project (Colab) or finds the checkout
  first = next(c for c in nb.cells if c.cell_type == "code")
  assert "pip" in first.source and "K15_NOTEBOOK_SIZE" in first.source


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs(path, tmp_path, monkeypatch):
  from nbclient import NotebookClient  # noqa: PLC0415

  monkeypatch.setenv("K15_NOTEBOOK_SIZE", "runlocal")
  monkeypatch.setenv("K15_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.delenv("K15_FIGURES_WORKDIR", raising=False)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(path, as_version=4)
  # run where Jupyter would: in the notebook's directory, in the checkout
  where = {"metadata": {"path": os.path.dirname(path)}}
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources=where).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
