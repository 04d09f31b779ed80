"""`lwapi` as an administrator uses it: real processes, real PostgreSQL, scriptable output."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.e2e.conftest import free_port
from tests.integration.support import accounting, pool, sample_history, snapshot

LWAPI = [sys.executable, "-m", "edge.cli"]


def run_lwapi(env: dict[str, str], *args: str, stdin: str | None = None,
              ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*LWAPI, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120,
                          check=False)
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one `error:` line a failed command printed, checked to be alone and free of tracebacks."""
    assert done.returncode != 0 and done.stdout == ""
    assert "Traceback" not in done.stderr and done.stderr.endswith("\n")
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ")
    return line


@pytest.fixture
def lwapi(database_url: str):
    env = {**os.environ, "DATABASE_URL": database_url}

    def run(*args: str, stdin: str | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
        return run_lwapi(env, *args, stdin=stdin, ok=ok)
    return run


def test_administration_flow(lwapi) -> None:
    assert "database ready" in lwapi("db", "init").stdout
    lwapi("user", "add", "lead@uni.edu", "--name", "Lead", "--password-stdin", stdin="correct horse battery\n")
    lwapi("user", "add", "ra@uni.edu", "--name", "Research Assistant")
    lwapi("project", "create", "genomics", "--name", "Genomics Lab", "--creator", "lead@uni.edu")
    lwapi("credits", "grant", "genomics", "500000", "--reason", "2026 allocation")
    lwapi("credits", "correct", "genomics", "-1500", "--reason", "billing error")
    lwapi("member", "add", "genomics", "ra@uni.edu", "--role", "user")
    for model in ("llama-3", "qwen2"):  # a key may allow only models of the catalog
        lwapi("model", "add", model, "--backend", "vllm", "--base-url", f"http://{model}:8000/v1")
    unknown = lwapi("key", "create", "genomics", "--owner", "ra@uni.edu", "--name", "x", "--models", "llama-4", ok=False)
    assert unknown.returncode != 0 and "no model named llama-4" in unknown.stderr
    created = lwapi("key", "create", "genomics", "--owner", "ra@uni.edu", "--name", "notebook", "--rpm", "60",
                    "--tpm", "100000", "--cap", "20000", "--valid-until", "2027-06-30T00:00:00+08:00",
                    "--models", "llama-3,qwen2")
    secret = created.stdout.strip()
    assert secret.startswith("sk-lw-") and "\n" not in secret  # the secret alone on stdout
    keys = json.loads(lwapi("key", "list", "genomics", "--json").stdout)
    assert len(keys) == 1 and keys[0]["status"] == "active" and keys[0]["allowed_models"] == ["llama-3", "qwen2"]
    assert secret not in json.dumps(keys) and keys[0]["display_prefix"] == secret[:12]
    key_id = keys[0]["key_id"]
    lwapi("key", "edit", key_id, "--rpm", "120", "--no-cap")
    edited = json.loads(lwapi("key", "list", "genomics", "--json").stdout)[0]
    assert (edited["rpm_limit"], edited["cap_credits"], edited["tpm_limit"]) == (120, None, 100000)
    lwapi("key", "revoke", key_id)
    assert json.loads(lwapi("key", "list", "genomics", "--json").stdout)[0]["status"] == "revoked"
    shown = json.loads(lwapi("project", "show", "genomics", "--json").stdout)
    assert (shown["granted_credits"], shown["corrections_credits"], shown["remaining_credits"]) == (
        500000, -1500, 498500)
    assert [m["role"] for m in shown["members"]] == ["creator", "user"]
    text = lwapi("project", "show", "genomics").stdout
    assert "remaining: 498500" in text
    lwapi("member", "role", "genomics", "ra@uni.edu", "--role", "creator")
    roles = {m["email"]: m["role"] for m in json.loads(lwapi("project", "show", "genomics", "--json").stdout)["members"]}
    assert roles == {"ra@uni.edu": "creator", "lead@uni.edu": "manager"}
    status = json.loads(lwapi("projections", "status", "--json").stdout)
    assert all(s["lag_events"] == 0 for s in status)
    assert all(s["set_aside_events"] == 0 for s in status)
    assert lwapi("projections", "set-aside").stdout.strip() == "(none)"
    assert "rebuilt 9 read models" in lwapi("projections", "rebuild").stdout
    checked = json.loads(lwapi("db", "check", "--json").stdout)
    assert checked["set_aside_events"] == 0
    assert checked["append_only_guard"] is True and checked["hash_chain"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["project", "show", "nope"], "no project with code nope"),
        (["user", "add", "not-an-email", "--name", "X"], "not an e-mail address"),
        (["key", "revoke", "123"], "not a key id"),
        (["key", "revoke", "5f0c6a3e-58a4-4a53-9d36-3b8b4a3b6f77"], "no key"),
        (["credits", "grant", "nope", "10", "--reason", "x"], "no project"),
        (["project", "create", "Bad Code!", "--name", "x", "--creator", "a@b.org"], "no user"),
    ],
)
def test_bad_input_gets_one_line_and_nonzero_exit(lwapi, args: list[str], message: str) -> None:
    lwapi("db", "init")
    done = lwapi(*args, ok=False)
    assert done.returncode != 0
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_refused_commands_write_nothing(lwapi, database_url: str) -> None:
    lwapi("user", "add", "a@uni.edu", "--name", "A")
    lwapi("project", "create", "p1", "--name", "P", "--creator", "a@uni.edu")
    with psycopg.connect(database_url) as conn:
        before = conn.execute("SELECT count(*) FROM accounting_events").fetchone()
    for args in (["credits", "grant", "p1", "-5", "--reason", "x"], ["credits", "grant", "p1", "0", "--reason", "x"],
                 ["credits", "correct", "p1", "0", "--reason", "x"], ["member", "remove", "p1", "a@uni.edu"],
                 ["project", "create", "p1", "--name", "again", "--creator", "a@uni.edu"],
                 ["user", "add", "A@uni.edu", "--name", "dup"],
                 ["key", "create", "p1", "--owner", "a@uni.edu", "--name", "k", "--rpm", "0"],
                 ["key", "create", "p1", "--owner", "a@uni.edu", "--name", "k", "--valid-from", "yesterday"],
                 # times and text no read model could hold: refused before they become events
                 ["key", "create", "p1", "--owner", "a@uni.edu", "--name", "k", "--valid-until",
                  "9999-12-31T23:00:00-05:00"],
                 ["key", "create", "p1", "--owner", "a@uni.edu", "--name", "k", "--valid-from", "1900-01-01"],
                 ["key", "create", "p1", "--owner", "a@uni.edu", "--name", "bad\udcffbyte"],  # argv byte 0xff
                 ["model", "add", "m1", "--backend", "openai", "--base-url", "http://127.0.0.1:9",
                  "--description", "bell\x07"]):
        done = lwapi(*args, ok=False)
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr.startswith("error: ")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM accounting_events").fetchone() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["credits", "grant", "p1", "abc", "--reason", "x"],
         "lwapi credits grant: invalid value for 'AMOUNT': 'abc' is not a valid integer"),
        (["key", "create", "p1", "--owner", "a@uni.edu", "--name", "k", "--rpm", "lots"],
         "lwapi key create: invalid value for '--rpm': 'lots' is not a valid integer"),
        (["member", "add", "p1", "a@uni.edu", "--role", "admin"],
         "lwapi member add: invalid value for '--role': 'admin' is not one of 'manager', 'user'"),
        (["credits", "correct", "p1", "-5"], "lwapi credits correct: missing option '--reason'"),
        (["user", "add", "b@uni.edu"], "lwapi user add: missing option '--name'"),
        (["project", "list", "--verbose"], "lwapi project list: no such option '--verbose'"),
        (["project", "show"], "lwapi project show: missing argument 'CODE'"),
        (["project", "show", "p1", "p2"], "lwapi project show: got unexpected extra argument (p2)"),
        (["--verbose", "project", "list"], "lwapi: no such option '--verbose'"),
        (["frobnicate"], "lwapi: no such command 'frobnicate'"),
        (["model", "add", "m", "--backend", "vllm", "--base-url", "http://gpu1/v1", "--api-key-env", "K",
          "--api-key-file", "/k"], "lwapi model add: give --api-key-env or --api-key-file, not both"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(lwapi, database_url: str, args: list[str], message: str) -> None:
    lwapi("user", "add", "a@uni.edu", "--name", "A")
    lwapi("project", "create", "p1", "--name", "P", "--creator", "a@uni.edu")
    with psycopg.connect(database_url) as conn:
        before = conn.execute("SELECT count(*) FROM accounting_events").fetchone()
    done = lwapi(*args, ok=False)
    assert error_line(done) == f"error: {message}" and done.returncode == 2
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM accounting_events").fetchone() == before


def test_help_still_prints_usage(lwapi) -> None:
    done = lwapi("credits", "grant", "--help")
    assert done.stdout.startswith("Usage: lwapi credits grant [OPTIONS] CODE AMOUNT") and "--reason" in done.stdout
    assert "Commands:" in lwapi("--help").stdout


@pytest.mark.parametrize("args", [["project", "list"], ["db", "check"], ["key", "list", "X"]])
def test_unreachable_database_is_one_line_without_the_password(args: list[str]) -> None:
    port = free_port()  # nothing listens there: the connection is refused
    env = {**os.environ, "DATABASE_URL": f"postgresql://u:s3cret-pw@127.0.0.1:{port}/x", "LWAPI_DB_TIMEOUT_S": "1"}
    done = run_lwapi(env, *args, ok=False)
    line = error_line(done)
    assert done.returncode == 2
    assert line.startswith(f"error: cannot reach the database at 127.0.0.1:{port}/x: ")
    assert "refused" in line.lower() and "s3cret" not in line


def test_list_commands_print_json(lwapi) -> None:
    lwapi("user", "add", "root@uni.edu", "--name", "Root", "--admin")
    lwapi("user", "add", "lead@uni.edu", "--name", "Lead", "--password-stdin", stdin="correct horse battery\n")
    lwapi("project", "create", "genomics", "--name", "Genomics Lab", "--creator", "lead@uni.edu")
    lwapi("project", "create", "astro", "--name", "Astronomy", "--creator", "root@uni.edu")
    lwapi("credits", "grant", "genomics", "1000", "--reason", "allocation")
    users = json.loads(lwapi("user", "list", "--json").stdout)
    assert [(u["email"], u["display_name"], u["is_admin"], u["has_password"]) for u in users] == [
        ("lead@uni.edu", "Lead", False, True), ("root@uni.edu", "Root", True, False)]
    projects = json.loads(lwapi("project", "list", "--json").stdout)
    assert [(p["code"], p["name"], p["archived"], p["granted_credits"], p["remaining_credits"]) for p in projects] == [
        ("astro", "Astronomy", False, 0, 0), ("genomics", "Genomics Lab", False, 1000, 1000)]


async def test_rebuild_through_the_cli_leaves_the_read_models_unchanged(lwapi, database_url: str) -> None:
    sample_history(accounting(database_url), random.Random(11), projects=2, batches=6)
    lwapi("user", "add", "x@uni.edu", "--name", "X", "--admin")
    assert all(s["lag_events"] == 0 for s in json.loads(lwapi("projections", "status", "--json").stdout))
    db = await pool(database_url)
    try:
        async with db.acquire() as conn:
            before = await snapshot(conn)
        assert "rebuilt 9 read models" in lwapi("projections", "rebuild").stdout
        async with db.acquire() as conn:
            after = await snapshot(conn)
    finally:
        await db.close()
    assert after == before
    assert before["usage_rollups"] and len(before["users"]) == 6


def test_events_set_aside_are_counted_and_listed(lwapi, database_url: str) -> None:
    app = accounting(database_url)
    sample_history(app, random.Random(5), projects=1, batches=1)
    model = app.get_model("a")
    model._description_changed(description="nul\x00inside")  # as a release that did not check it stored it
    app.save(model)
    status = {s["projection"]: s for s in json.loads(lwapi("projections", "status", "--json").stdout)}
    assert status["models"]["set_aside_events"] == 1 and status["models"]["lag_events"] == 0
    assert status["projects"]["set_aside_events"] == 0
    listed = json.loads(lwapi("projections", "set-aside", "--json").stdout)
    assert [(r["projection"], r["topic"]) for r in listed] == [
        ("models", "domain.catalog:ServedModel.DescriptionChanged")]
    assert "invalid byte sequence" in listed[0]["error"]
    assert "DescriptionChanged" in lwapi("projections", "set-aside").stdout
    assert json.loads(lwapi("db", "check", "--json").stdout)["set_aside_events"] == 1


def test_data_dir_alone_starts_and_stops_the_embedded_server() -> None:
    # Short and world-traversable: the socket path has a length limit, and the server may run unprivileged.
    data_dir = Path(tempfile.mkdtemp(prefix="lwcli-", dir="/tmp"))
    data_dir.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LWAPI_DATA_DIR")}

    def lwapi(*args: str) -> subprocess.CompletedProcess[str]:
        return run_lwapi(env, "--data-dir", str(data_dir), *args)

    def server(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "adapters.pg_embedded", command, "--data-dir", str(data_dir)],
                              capture_output=True, text=True, timeout=120, check=False)
    try:
        assert "database ready" in lwapi("db", "init").stdout
        lwapi("user", "add", "admin@uni.edu", "--name", "Admin", "--admin")
        assert server("status").stdout.strip() == "stopped"  # each command stops the server it started
        [user] = json.loads(lwapi("user", "list", "--json").stdout)  # a new process sees what the last one wrote
        assert (user["email"], user["is_admin"]) == ("admin@uni.edu", True)
        assert (data_dir / "pg" / "PG_VERSION").exists()
    finally:
        server("stop")
        shutil.rmtree(data_dir, ignore_errors=True)


def test_malformed_database_url_is_a_setup_error(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": "mysql://nope"}
    done = subprocess.run([*LWAPI, "db", "check"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "postgresql://" in done.stderr


def test_model_catalog_commands(lwapi) -> None:
    lwapi("model", "add", "llama-3", "--backend", "vllm", "--base-url", "http://gpu1:8000/v1", "--upstream-model",
          "meta/llama-3", "--price-prompt", "100", "--price-completion", "300", "--api-key-env", "GPU_KEY",
          "--description", "Llama 3")
    lwapi("model", "deploy", "llama-3", "--backend", "vllm", "--base-url", "http://gpu2:8000/v1", "--weight", "2")
    lwapi("model", "price", "llama-3", "--prompt", "120", "--completion", "360", "--effective-at", "2099-01-01")
    [model] = json.loads(lwapi("model", "list", "--json").stdout)
    assert [d["name"] for d in model["deployments"]] == ["vllm-gpu1", "vllm-gpu2"]
    assert model["deployments"][0]["credential_ref"] == "env:GPU_KEY"
    assert model["prices"]["prompt_per_mtok"] == 100 and len(model["price_schedule"]) == 2  # the new one is future
    lwapi("model", "undeploy", "llama-3", "vllm-gpu1")
    bad = lwapi("model", "add", "x", "--backend", "openai", "--base-url", "http://u:p@host/v1", ok=False)
    assert bad.returncode == 1 and "credentials" in bad.stderr
    dup = lwapi("model", "add", "llama-3", "--backend", "vllm", "--base-url", "http://gpu3/v1", ok=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    lwapi("model", "remove", "llama-3")
    assert json.loads(lwapi("model", "list", "--json").stdout) == []
    assert len(json.loads(lwapi("model", "list", "--all", "--json").stdout)) == 1


def test_model_discover_adds_what_running_servers_offer(lwapi) -> None:
    from tests.e2e.conftest import free_port, wait_http  # noqa: PLC0415

    servers = []
    try:
        for module in ("tests.fake_upstream", "tests.fake_ollama"):
            port = free_port()
            servers.append((subprocess.Popen([sys.executable, "-m", module, "--port", str(port)]), port))
        wait_http(f"http://127.0.0.1:{servers[0][1]}/v1/models")
        wait_http(f"http://127.0.0.1:{servers[1][1]}/api/tags")
        openai_like = lwapi("model", "discover", f"http://127.0.0.1:{servers[0][1]}", "--backend", "vllm")
        assert "1 model(s) added" in openai_like.stdout
        ollama = lwapi("model", "discover", f"http://127.0.0.1:{servers[1][1]}", "--price-completion", "5")
        assert "(ollama)" in ollama.stdout and "llama3.2:1b" in ollama.stdout
        again = lwapi("model", "discover", f"http://127.0.0.1:{servers[1][1]}")
        assert "0 model(s) added" in again.stdout and "already exists" in again.stderr
        models = {m["name"]: m for m in json.loads(lwapi("model", "list", "--json").stdout)}
        assert models["fake"]["deployments"][0]["backend"] == "vllm"
        assert models["llama3.2:1b"]["deployments"][0]["base_url"] == f"http://127.0.0.1:{servers[1][1]}"
        nothing = lwapi("model", "discover", "http://127.0.0.1:9", ok=False)
        assert nothing.returncode != 0 and "no Ollama or OpenAI-compatible" in nothing.stderr
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=10)


def test_model_apply_brings_the_catalog_up_to_a_file(lwapi, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    text = """
[[models]]
name = "llama-3"
description = "Llama 3"
price_prompt = 100
price_completion = 300
[[models.deployments]]
name = "gpu1"
backend = "vllm"
base_url = "http://gpu1:8000/v1"
upstream_model = "meta/llama-3"
api_key_env = "GPU1_KEY"
"""
    catalog.write_text(text)
    assert "added model llama-3" in lwapi("model", "apply", str(catalog)).stdout
    assert "already matches" in lwapi("model", "apply", str(catalog)).stdout
    catalog.write_text(text.replace("price_prompt = 100", "price_prompt = 120") + """
[[models.deployments]]
name = "gpu2"
backend = "vllm"
base_url = "http://gpu2:8000/v1"
""")
    changed = lwapi("model", "apply", str(catalog)).stdout
    assert "llama-3: added deployment gpu2" in changed and "llama-3: prices changed" in changed
    [model] = json.loads(lwapi("model", "list", "--json").stdout)
    assert model["prices"]["prompt_per_mtok"] == 120 and len(model["deployments"]) == 2
    catalog.write_text("[[models]]\nname = 'x'\n")
    bad = lwapi("model", "apply", str(catalog), ok=False)
    assert bad.returncode == 1 and "needs at least one" in bad.stderr
    catalog.write_text("not = [toml")
    assert "catalog file" in lwapi("model", "apply", str(catalog), ok=False).stderr
