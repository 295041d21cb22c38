"""An agent host installs the agent's dependencies only (pyproject.toml: the server's are the
`server` extra): nothing the agent, replay or association run may import a server module,
and the server command without its extra says what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from deeptrace.server.main import SERVER_MODULES

# A Python in which the server's libraries cannot be imported, as on a host without the extra.
WITHOUT_SERVER = textwrap.dedent(f"""
    import sys
    for name in {[m.split(".")[0] for m in SERVER_MODULES] + ["starlette"]!r}:
        sys.modules[name] = None  # `import name` raises ImportError
""")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_SERVER + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


def test_the_agent_replay_and_association_import_no_server_library():
    r = run("""
        from click.testing import CliRunner
        import deeptrace.agent.collector, deeptrace.agent.shipper, deeptrace.agent.spool, deeptrace.agent.services
        import deeptrace.capture.pipeline, deeptrace.capture.replay, deeptrace.capture.exchanges
        import deeptrace.association.associate, deeptrace.association.streaming
        import deeptrace.schema, deeptrace.cli
        for command in (["agent", "--help"], ["record", "--help"], ["replay", "--help"], ["associate", "--help"]):
            result = CliRunner().invoke(deeptrace.cli.main, command)
            assert result.exit_code == 0, (command, result.output, result.exception)
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_server_command_without_its_extra_says_what_to_install():
    r = run("""
        from click.testing import CliRunner
        import deeptrace.cli
        result = CliRunner().invoke(deeptrace.cli.main, ["server", "--no-auth"])
        print(result.exit_code)
        print(result.output)
    """)
    code, _, output = r.stdout.partition("\n")
    assert r.returncode == 0, r.stderr
    assert code == "1" and "pip install 'deeptrace[server]'" in output and "fastapi" in output, r.stdout
