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
