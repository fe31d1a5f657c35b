"""backend="omnicache" works in a fresh process that never imports omnicompile."""
import subprocess
import sys

SCRIPT = r"""
import sys, torch
assert "omnicompile" not in sys.modules
lin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
fn = torch.compile(lin, backend="omnicache", options={"inner_backend": "eager"}, fullgraph=True)
x = torch.randn(2, 4)
with torch.no_grad():
    torch.testing.assert_close(fn(x), lin(x))
assert "omnicompile" in sys.modules   # loaded through the torch_dynamo_backends entry point
import omnicompile
print("fallback:", omnicompile.last_report().graphs[0].fallback.code)
"""


def test_entry_point_in_fresh_process():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fallback: no_blocks" in r.stdout


def test_import_then_string_backend_in_fresh_process():
    script = "import omnicompile\n" + SCRIPT.replace('assert "omnicompile" not in sys.modules', "")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_bare_names_are_not_installed():
    code = ("import importlib.util, os; os.chdir('/'); "
            "print([n for n in ('passes', 'graphs') if importlib.util.find_spec(n)])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_setup_lists_every_package():
    """A wheel holds only the packages setup.py names: every folder with an ``__init__.py``
    under omnicompile/, passes/, graphs/ and kernels/ must be listed."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "setup.py").read_text()
    listed = set(re.findall(r'"(omnicompile(?:\.\w+)*)"', text.split("packages=", 1)[1].split("]", 1)[0]))
    top = {"omnicompile": "omnicompile", "passes": "omnicompile.passes", "graphs": "omnicompile.graphs",
           "kernels": "omnicompile.kernels"}
    found = set()
    for folder, name in top.items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            found.add(".".join((name,) + rel))
    assert found == listed
