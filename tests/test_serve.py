"""`charlm serve`: the HTTP API (real server, real sockets), the page in a real headless Chromium, and the command
as a process (its address, its warning, Ctrl-C)."""

import dataclasses
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvicorn
from conftest import ROOT, open_page, shown_text, tiny

import charlm
from charlm import inside
from charlm.__main__ import main
from charlm.callbacks import GenerationCallback
from charlm.serve.app import playground
from charlm.serve.catalogue import Runs
from charlm.serve.stream import produce
from charlm.settings import Sampling

MAX_PROMPT, MAX_NEW_TOKENS = 200, 100_000  # room for a generation long enough to be stopped half-way
MAX_CLIENTS = 10  # 8 at once are tested, with room for one that is ending as they start
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> Path:
    """A folder with a GPT's run, a bigram's and a byte-level GPT's, trained by `charlm.fit` (4 steps each)."""
    folder = tmp_path_factory.mktemp("served")
    here = Path.cwd()
    os.chdir(folder)
    try:
        charlm.fit(tiny(corpus))
        bigram = ["--config", str(ROOT / "configs/bigram.yaml"), "--data.path", str(corpus)]
        charlm.fit([*bigram, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                    "--trainer.enable_progress_bar", "false", "--generation.max_new_tokens", "5"])  # fmt: skip
        charlm.fit([*tiny(corpus), "--data.tokenizer", "bytes", "--trainer.logger.init_args.name", "bytes-plays"])
    finally:
        os.chdir(here)
    return folder


@pytest.fixture(scope="module")
def url(runs):
    """The playground's address: `playground()` served by uvicorn in a thread, the GPT's run served."""
    served = runs / "checkpoints/gpt-cpu-plays/version_0/last.ckpt"
    hosts = {"127.0.0.1", "localhost", "::1"}
    app = playground(Runs(runs / "checkpoints", served, "cpu"), MAX_PROMPT, MAX_NEW_TOKENS, MAX_CLIENTS, hosts)
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    server.should_exit = True
    thread.join()


def request(url: str, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, parsed JSON) of one request."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    body = body.encode() if isinstance(body, str) else body  # UTF-8, where http.client would send Latin-1
    connection.request(method, path, body=body, headers={**JSON, **(headers or {})})
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return answer


def events(response):
    """The server-sent events of a streamed answer, as (kind, data), as they arrive."""
    kind = None
    for line in response:
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield kind, json.loads(line.removeprefix("data: "))


def stream(url: str, **settings) -> list[tuple[str, dict]]:
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=120)
    connection.request("POST", "/api/generate", body=json.dumps(settings), headers=JSON)
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    received = list(events(response))
    connection.close()
    return received


def text_of(received) -> str:
    """What the page shows: the prompt, then each token's text, then the last bytes the decoder held."""
    kinds = [kind for kind, _ in received]
    assert kinds[0] == "start" and kinds[-1] == "end" and set(kinds[1:-1]) <= {"token"}
    return received[0][1]["prompt"] + "".join(data["text"] for _, data in received[1:])


def cli_text(ckpt: Path, capsys, *flags) -> str:
    main(["generate", "--ckpt_path", str(ckpt), "--device", "cpu", *flags])
    return capsys.readouterr().out.removesuffix("\n")


def test_runs_lists_every_run_under_the_folder_with_its_facts(url, runs):
    status, answer = request(url, "GET", "/api/runs")
    assert status == 200 and answer["device"] == "cpu" and answer["generating"] == 0
    by_name = {run["name"]: run for run in answer["runs"]}
    assert set(by_name) == {"gpt-cpu-plays/version_0", "bigram-plays/version_0", "bytes-plays/version_0"}
    gpt, bigram = by_name["gpt-cpu-plays/version_0"], by_name["bigram-plays/version_0"]
    assert gpt["served"] and not bigram["served"]
    assert (gpt["net"], gpt["attention"], gpt["step"], gpt["tokenizer"]) == ("GPT", True, 4, "chars")
    assert (bigram["net"], bigram["attention"], bigram["parameters"]) == ("Bigram", False, 65 * 65)
    assert isinstance(gpt["val_loss"], float) and gpt["block_size"] == 32


def test_a_run_added_later_is_listed_and_a_link_out_of_the_folder_or_a_broken_file_is_not_served(url, runs, tmp_path):
    outside = tmp_path / "elsewhere"
    (outside / "run").mkdir(parents=True)
    shutil.copy(runs / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", outside / "run/last.ckpt")
    (runs / "checkpoints/linked").symlink_to(outside, target_is_directory=True)
    (runs / "checkpoints/broken").mkdir()
    (runs / "checkpoints/broken/last.ckpt").write_bytes(b"not a checkpoint")
    try:
        names = {run["name"]: run for run in request(url, "GET", "/api/runs")[1]["runs"]}
        assert "linked/run" not in names and "bad" not in names
        assert "is not a valid checkpoint" in names["broken"]["error"]
        for run in ("linked/run", str(outside / "run/last.ckpt"), "../elsewhere/run", "broken/../gpt-cpu-plays"):
            status, answer = request(url, "POST", "/api/generate", json.dumps({"run": run}))
            assert status == 404 and "is not one of this server's" in answer["error"], run
        status, answer = request(url, "POST", "/api/generate", json.dumps({"run": "broken"}))
        assert status == 422 and "is not a valid checkpoint" in answer["error"]
    finally:
        (runs / "checkpoints/linked").unlink()
        shutil.rmtree(runs / "checkpoints/broken")


def test_the_stream_is_the_text_charlm_generate_prints_for_the_same_seed_and_settings(url, runs, capsys):
    for settings, flags in [
        ({"prompt": "ROMEO:", "max_new_tokens": 80, "seed": 7}, ["--prompt", "ROMEO:", "--max_new_tokens", "80",
                                                                  "--seed", "7"]),
        ({"prompt": "", "max_new_tokens": 40, "temperature": 1.3, "top_k": 5, "top_p": 0.9, "seed": 3},
         ["--max_new_tokens", "40", "--temperature", "1.3", "--top_k", "5", "--top_p", "0.9", "--seed", "3"]),
        ({"max_new_tokens": 30, "temperature": 0, "run": "bigram-plays/version_0"}, ["--max_new_tokens", "30",
                                                                                     "--temperature", "0"]),
    ]:  # fmt: skip
        received = stream(url, **settings)
        run = received[0][1]["run"]
        assert text_of(received) == cli_text(runs / "checkpoints" / run, capsys, *flags)
        tokens = [data for kind, data in received if kind == "token"]
        assert len(tokens) == settings["max_new_tokens"] and received[-1][1]["tokens"] == len(tokens)
        for token in tokens:  # the distribution it was drawn from, the drawn token among its candidates
            top = dict(token["top"])
            assert top[token["label"]] == token["p"] and token["label"] == token["text"]
            rounding = 0.5e-4 * len(top) + 1e-9  # each probability is sent to 4 decimals
            assert (
                sum(top.values()) <= 1 + rounding and list(top.values())[:10] == sorted(top.values(), reverse=True)[:10]
            )
        if settings.get("top_k"):
            assert all(len(token["top"]) <= 5 for token in tokens)  # the others have probability 0


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("{", 400, "the body is not JSON"),
        ("[1, 2]", 400, "the body is a JSON list"),
        (b'{"prompt": "\xeb"}', 400, "the body is not JSON ('utf-8' codec can't decode byte 0xeb"),
        ('{"temperature": -1}', 422, "temperature -1 is outside [0, inf]"),
        ('{"temperature": NaN}', 422, 'temperature "NaN" is not a finite number'),
        ('{"temperature": 1e999}', 422, "temperature Infinity is not a finite number"),
        ('{"top_p": 0}', 422, "top_p 0 is outside (0, 1]"),
        ('{"top_k": 0}', 422, "top_k 0 is outside [1, inf]"),
        ('{"top_k": true}', 422, "top_k true is not a whole number"),
        ('{"seed": 1.5}', 422, "seed 1.5 is not a whole number"),
        ('{"seed": 18446744073709551616}', 422, "seed 18446744073709551616 is outside"),
        ('{"max_new_tokens": 100001}', 422, "max_new_tokens 100001 is outside [0, 100000]"),
        (json.dumps({"prompt": "a" * 201}), 422, "prompt has length 201, outside [0, 200]"),
        ('{"prompt": "Zoë"}', 422, "prompt has characters ['ë'] that are not among the model's 65: change it, or pass"),
        ('{"prompt": 5}', 422, "prompt 5 is not a string"),
        ('{"unknown": "maybe"}', 422, 'unknown "maybe" is not one of "error", "skip"'),
        ('{"promt": "x"}', 422, "unknown field 'promt': the fields are prompt, max_new_tokens"),
        ('{"run": "nope"}', 404, "run 'nope' is not one of this server's"),
        (json.dumps({"prompt": "a" * 2_000_000}), 413, "the body is over"),
    ],
)
def test_bad_generate_requests_are_a_4xx_with_a_one_line_message_and_the_server_goes_on(url, body, status, message):
    answer = request(url, "POST", "/api/generate", body)
    assert answer[0] == status and message in answer[1]["error"] and "\n" not in answer[1]["error"]
    assert text_of(stream(url, max_new_tokens=3))  # still serving


@pytest.mark.parametrize(
    ("name", "value", "refusal"),
    [
        ("temperature", -0.5, "-0.5 is outside [0, inf]"),
        ("top_k", 0, "0 is outside [1, inf]"),
        ("top_p", 1.5, "1.5 is outside (0, 1]"),
        ("max_new_tokens", -1, "-1 is outside [0, inf]"),
        ("seed", 2**64, f"{2**64} is outside [{-(2**63)}, {2**64 - 1}]"),
    ],
)
def test_a_setting_out_of_bounds_is_refused_in_the_same_words_by_the_cli_the_callback_and_the_api(
    url, name, value, refusal
):
    with pytest.raises(SystemExit) as refused:
        main(["generate", "--ckpt_path", "does-not-matter.ckpt", f"--{name}", str(value)])
    assert refused.value.code == f"charlm: error: --{name} {refusal}"
    with pytest.raises(ValueError) as refused:
        GenerationCallback(**{name: value})
    assert str(refused.value) == f"--generation.{name} {refusal}"
    if name == "max_new_tokens":  # the server's --max_new_tokens lowers the bound, in the same words
        refusal = refusal.replace("inf]", f"{MAX_NEW_TOKENS}]")
    assert request(url, "POST", "/api/generate", json.dumps({name: value})) == (422, {"error": f"{name} {refusal}"})


def test_the_page_is_offered_the_settings_defaults_and_the_servers_bounds(url):
    offered = request(url, "GET", "/api/runs")[1]["settings"]
    assert {name: offered[name]["default"] for name in offered} == {
        f.name: f.default for f in dataclasses.fields(Sampling)
    }
    assert offered["prompt"]["max"] == 200 and offered["max_new_tokens"]["max"] == 100000
    assert offered["top_p"] == {"default": None, "min": 0, "max": 1, "above": True}


def test_a_byte_level_models_stream_is_the_clis_text_even_where_its_bytes_are_no_utf_8(url, runs, capsys):
    """A character of several bytes arrives as several tokens, the first ones with no text; bytes that are no UTF-8
    come out escaped, as the CLI prints them."""
    settings = {"prompt": "Zoë, café", "max_new_tokens": 60, "temperature": 2.0, "seed": 5}
    received = stream(url, run="bytes-plays/version_0", **settings)
    ckpt = runs / "checkpoints/bytes-plays/version_0"
    flags = ["--prompt", "Zoë, café", "--max_new_tokens", "60", "--temperature", "2.0", "--seed", "5"]
    assert text_of(received) == cli_text(ckpt, capsys, *flags)
    start = received[0][1]
    assert len(start["ids"]) == len("Zoë, café".encode()) and start["labels"][2:4] == ["ë", ""]  # one per byte
    assert "\\x" in text_of(received)  # a 4-step model at temperature 2 draws bytes that are no UTF-8
    ids = [*start["ids"], *(data["id"] for kind, data in received if kind == "token")]
    status, answer = request(url, "POST", "/api/attention", json.dumps({"run": "bytes-plays/version_0", "ids": ids}))
    assert status == 200 and len(answer["labels"]) == 32 and answer["first"] == len(ids) - 32


def test_a_lone_surrogate_is_refused_in_one_line_by_a_byte_level_model_and_skipped_on_request(url):
    """No UTF-8 encodes "\\ud800" (JSON can send it): a byte-level model never saw it, as a character model never saw
    an accented letter."""
    body = json.dumps({"run": "bytes-plays/version_0", "prompt": "RO\ud800"})
    assert request(url, "POST", "/api/generate", body) == (
        422,
        {"error": "prompt has characters ['\\ud800'] that are not among the model's 256: change it, or pass unknown "
         "skip to drop them"},
    )  # fmt: skip
    body = json.dumps({"run": "bytes-plays/version_0", "text": "RO\ud800"})
    assert request(url, "POST", "/api/attention", body)[0] == 422
    received = stream(url, run="bytes-plays/version_0", prompt="RO\ud800", unknown="skip", max_new_tokens=3)
    assert received[0][1]["prompt"] == "RO" and received[-1][0] == "end"


def test_unknown_prompt_characters_can_be_skipped_as_the_cli_skips_them(url, runs, capsys):
    received = stream(url, prompt="Zoë", unknown="skip", max_new_tokens=10)
    ckpt = runs / "checkpoints/gpt-cpu-plays/version_0"
    assert text_of(received) == cli_text(ckpt, capsys, "--prompt", "Zoë", "--unknown", "skip", "--max_new_tokens", "10")


def test_attention_is_every_layer_and_heads_weights_of_one_position_over_those_before_it(url):
    status, answer = request(url, "POST", "/api/attention", json.dumps({"text": "ROMEO: hi", "pos": 4}))
    assert status == 200 and answer["labels"] == list("ROMEO") and answer["first"] == 0
    weights = answer["weights"]
    assert (len(weights), len(weights[0]), len(weights[0][0])) == (1, 2, 5)  # 1 layer, 2 heads, positions 0..4
    assert all(abs(sum(row) - 1) < 1e-3 for layer in weights for row in layer)

    long = "the king " * 10  # past the block size (32): the model reads the last 32 characters up to pos
    status, answer = request(url, "POST", "/api/attention", json.dumps({"text": long}))
    assert answer["first"] == len(long) - 32 and len(answer["labels"]) == len(answer["weights"][0][0]) == 32
    ids = request(url, "POST", "/api/attention", json.dumps({"ids": [1, 2, 3]}))[1]
    assert ids["pos"] == 2 and len(ids["weights"][0][0]) == 3


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"text": "abc", "pos": 3}, 422, "pos 3 is past the text's last position, 2"),
        ({"text": "abc", "ids": [1]}, 422, 'send one of "text" (a string) and "ids"'),
        ({}, 422, 'send one of "text" (a string) and "ids"'),
        ({"ids": [1, 65]}, 422, "ids: each must be a whole number in [0, 64]"),
        ({"text": "ë"}, 422, "text has characters ['ë'] that are not among the model's 65: change it"),
        ({"text": "ab", "run": "bigram-plays/version_0"}, 422, "is a Bigram, which has no attention"),
    ],
)
def test_bad_attention_requests_are_a_4xx_with_a_one_line_message(url, body, status, message):
    answer = request(url, "POST", "/api/attention", json.dumps(body))
    assert answer[0] == status and message in answer[1]["error"]


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "message"),
    [
        ("GET", "/api/runs", {"Host": "evil.example"}, 403, "Host 'evil.example' is not this server's: open it by"),
        ("GET", "/", {"Host": "evil.example:8000"}, 403, "Host 'evil.example:8000' is not this server's"),
        ("GET", "/api/runs", {"Host": "[::1"}, 403, "Host '[::1' is not this server's"),
        ("POST", "/api/generate", {"Origin": "http://evil.example"}, 403, "a request from 'http://evil.example', "),
        ("POST", "/api/attention", {"Origin": "null"}, 403, "a request from 'null', another site's page, is refused"),
        ("POST", "/api/generate", {"Content-Type": "text/plain"}, 415, "the body is text/plain: send JSON, with"),
        ("POST", "/api/attention", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "the body is appl"),
    ],
)
def test_what_another_sites_page_could_send_through_the_browser_is_refused_in_one_line(
    url, method, path, headers, status, message
):
    """DNS rebinding (a foreign Host), a cross-site request (a foreign or null Origin), a form's simple POST: each
    a 403 or 415 that names it, no CORS header, and the server goes on."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    connection.request(method, path, body='{"prompt": "Hi", "text": "Hi"}', headers={**JSON, **headers})
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == status and answer["error"].startswith(message) and "\n" not in answer["error"]
    assert not [name for name, _ in response.getheaders() if name.lower().startswith("access-control")]
    connection.close()
    own = {"Origin": url, "Host": url.removeprefix("http://")}  # the page's own requests carry its own origin
    assert request(url, "POST", "/api/attention", json.dumps({"text": "Hi"}), headers=own)[0] == 200


def test_other_paths_and_methods_answer_in_json(url):
    assert request(url, "GET", "/api/nope") == (404, {"error": "/api/nope: Not Found"})
    assert request(url, "GET", "/api/generate") == (405, {"error": "/api/generate: Method Not Allowed"})


def wait_until_idle(url: str) -> None:
    deadline = time.monotonic() + 30
    while request(url, "GET", "/api/runs")[1]["generating"]:
        assert time.monotonic() < deadline, "a generation went on after its client left"
        time.sleep(0.05)


def test_a_client_that_leaves_mid_stream_stops_its_generation(url):
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    connection.request("POST", "/api/generate", body=json.dumps({"max_new_tokens": MAX_NEW_TOKENS}), headers=JSON)
    received = events(connection.getresponse())
    assert next(received)[0] == "start" and next(received)[0] == "token"
    assert request(url, "GET", "/api/runs")[1]["generating"] == 1
    connection.close()  # 100,000 tokens would take minutes: the generation ends when the server sees it gone
    wait_until_idle(url)


def test_one_generation_more_than_max_clients_is_a_429_and_the_next_after_them_is_served(url):
    connections = []
    for _ in range(MAX_CLIENTS):
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        connection.request("POST", "/api/generate", body=json.dumps({"max_new_tokens": MAX_NEW_TOKENS}), headers=JSON)
        received = events(connection.getresponse())
        assert next(received)[0] == "start" and next(received)[0] == "token"  # its thread is running
        connections.append(connection)
    status, answer = request(url, "POST", "/api/generate", "{}")
    assert status == 429 and answer["error"] == (
        f"{MAX_CLIENTS} generations are running, the most this server runs at once: try again soon"
    )
    for connection in connections:
        connection.close()
    wait_until_idle(url)
    assert text_of(stream(url, max_new_tokens=3))


def test_a_burst_of_generations_at_once_gets_at_most_max_clients_of_them_started(url):
    """A slot is taken as a request is accepted, not once its stream starts: a burst cannot pass the limit."""
    wait_until_idle(url)

    def post(_):
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        connection.request("POST", "/api/generate", body=json.dumps({"max_new_tokens": MAX_NEW_TOKENS}), headers=JSON)
        return connection, connection.getresponse().status

    with ThreadPoolExecutor(3 * MAX_CLIENTS) as pool:
        answers = list(pool.map(post, range(3 * MAX_CLIENTS)))
    statuses = [status for _, status in answers]
    assert statuses.count(200) == MAX_CLIENTS and statuses.count(429) == 2 * MAX_CLIENTS
    assert request(url, "GET", "/api/runs")[1]["generating"] == MAX_CLIENTS
    for connection, _ in answers:
        connection.close()
    wait_until_idle(url)


def test_a_generation_asked_to_stop_takes_no_further_step(runs):
    from charlm import checkpoints

    net, tokenizer = checkpoints.load_net(runs / "checkpoints/gpt-cpu-plays/version_0/last.ckpt")
    stop, sent = threading.Event(), []

    def send(kind, data):
        sent.append(kind)
        stop.set()  # the client leaves as its first token goes out

    produce(net, tokenizer, "cpu", [0], Sampling(seed=1, max_new_tokens=1000, temperature=1.0), stop, send, {})
    assert sent == ["token", None] and all(block.attn.kv_cache is None for block in net.h)  # the cache is freed


def test_eight_clients_at_once_each_get_their_own_text(url):
    alone = {seed: text_of(stream(url, seed=seed, max_new_tokens=150)) for seed in range(8)}
    with ThreadPoolExecutor(8) as pool:
        together = dict(
            zip(range(8), pool.map(lambda seed: text_of(stream(url, seed=seed, max_new_tokens=150)), range(8)))
        )
    assert together == alone and len(set(alone.values())) == 8


def test_serve_prints_its_address_warns_off_localhost_and_stops_on_ctrl_c_with_130(runs):
    process = subprocess.Popen(
        [sys.executable, "-m", "charlm", "serve", "--host", "0.0.0.0", "--port", "0", "--allowed_hosts", "[box.lan]"],
        cwd=runs, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        assert line.startswith("charlm: playground at http://0.0.0.0:"), process.stderr.read()
        port = int(line.split(":")[3].split()[0])
        status, answer = request(f"http://127.0.0.1:{port}", "GET", "/api/runs")
        assert status == 200 and {run["name"] for run in answer["runs"]} >= {"gpt-cpu-plays/version_0"}
        assert request(f"http://127.0.0.1:{port}", "GET", "/api/runs", headers={"Host": f"box.lan:{port}"})[0] == 200
        assert request(f"http://127.0.0.1:{port}", "GET", "/api/runs", headers={"Host": "other.lan"})[0] == 403
        page = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        page.request("GET", "/")
        assert b"charlm playground" in page.getresponse().read()
        streaming = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        streaming.request("POST", "/api/generate", body=json.dumps({"max_new_tokens": 10000}), headers=JSON)
        received = events(streaming.getresponse())
        assert next(received)[0] == "start" and next(received)[0] == "token"
        process.send_signal(signal.SIGINT)  # with a generation under way: it ends, and so does the server
        assert process.wait(timeout=30) == 130
        assert list(received)[-1] == ("error", {"error": "the server stopped"})
        stderr = process.stderr.read()
        assert (
            "warning: listening on 0.0.0.0: anyone who can reach this machine can use it, by the names 0.0.0.0, "
            "127.0.0.1, ::1, box.lan, localhost (--allowed_hosts adds more)"
        ) in stderr
        assert stderr.endswith("charlm: SIGINT received: stopped\n") and "Traceback" not in stderr
    finally:
        process.kill()


def test_serve_without_its_extra_on_a_taken_port_or_a_foreign_host_says_so_in_one_line(runs, capsys):
    code = "import sys; sys.modules['uvicorn'] = None; from charlm.__main__ import main; main(['serve'])"
    result = subprocess.run([sys.executable, "-c", code], cwd=runs, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == "charlm: error: charlm serve needs uvicorn and starlette: pip install -e '.[serve]'\n"

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"cannot listen on 127.0.0.1:{port}: the port is in use: pass --port"):
            main(["serve", "--ckpt_path", str(runs / "checkpoints"), "--runs", str(runs / "checkpoints"),
                  "--port", str(port)])  # fmt: skip
    with pytest.raises(SystemExit, match=r"cannot listen on nosuch.invalid: it is no address of this machine: use 127"):
        main(["serve", "--ckpt_path", str(runs / "checkpoints"), "--host", "nosuch.invalid"])


# --- the page, in a real headless Chromium ------------------------------------------------------------------------


@pytest.fixture
def page(browser, url):
    with open_page(browser, url) as page:
        yield page


def test_the_page_streams_what_charlm_generate_prints_and_shows_a_characters_candidates_and_attention(
    page, runs, capsys
):
    page.fill("#prompt", "KING")
    page.fill("#max_new_tokens", "60")
    page.fill("#seed", "11")
    page.fill("#temperature", "0.9")
    page.click("#generate")
    page.wait_for_selector("#output[data-state=done]")
    ckpt = runs / "checkpoints/gpt-cpu-plays/version_0"
    assert shown_text(page) == cli_text(ckpt, capsys, "--prompt", "KING", "--max_new_tokens", "60", "--seed", "11",
                                        "--temperature", "0.9")  # fmt: skip

    page.click("#output .tok.gen >> nth=20")
    page.wait_for_selector("#heads figure")
    drawn = page.text_content("#output .tok.gen >> nth=20")
    assert page.text_content("#candidates .row.drawn .char") == {"\n": "↵", " ": "␣"}.get(drawn, drawn)
    assert page.locator("#candidates .row").count() >= 2
    assert page.locator("#heads figure").count() == 2  # 1 layer x 2 heads
    assert page.locator("#edges path").count() >= 1  # the edges to what it attended to
    page.click("#heads figure >> nth=1")  # head 2 alone, drawn under the text
    assert page.input_value("#head") == "1" and page.get_attribute("#heads figure >> nth=1", "class") == "chosen"

    page.click("#output .tok.prompt >> nth=2")
    page.wait_for_function("document.querySelectorAll('#heads canvas')[0].width === 3")  # positions 0..2
    assert "typed, not drawn" in page.text_content("#candidates")


def test_the_page_stops_a_long_generation_and_the_server_lets_it_go(page, url):
    page.fill("#max_new_tokens", str(MAX_NEW_TOKENS))
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#output .tok.gen').length > 20")
    page.click("#stop")
    assert page.get_attribute("#output", "data-state") == "stopped"
    count = page.locator("#output .tok.gen").count()
    wait_until_idle(url)
    assert page.locator("#output .tok.gen").count() == count < MAX_NEW_TOKENS  # nothing more came


def test_the_page_switches_runs_and_says_a_bigram_has_no_attention(page, runs, capsys):
    page.select_option("#run", "bigram-plays/version_0")
    page.fill("#max_new_tokens", "25")
    page.click("#generate")
    page.wait_for_selector("#output[data-state=done]")
    ckpt = runs / "checkpoints/bigram-plays/version_0"
    assert shown_text(page) == cli_text(ckpt, capsys, "--prompt", "ROMEO:", "--max_new_tokens", "25")
    page.click("#output .tok.gen >> nth=3")
    page.wait_for_selector("#candidates .row")
    assert page.is_visible("#no-attention") and not page.is_visible("#attention-pick")


def test_the_lens_the_heads_and_a_texts_surprise_answer_over_the_api(url):
    status, lens = request(url, "POST", "/api/lens", json.dumps({"text": "KING HENRY", "pos": 4}))
    assert status == 200 and lens["depths"] == ["embedding", "block 1"] and lens["pos"] == 4
    last = lens["rows"][-1]
    assert 1 <= last["rank"] <= 65 and sum(p for _, p in last["top"]) <= 1.001  # where "H" (after "KING ") ranks
    off = {"text": "KING HENRY VI:", "off_heads": [[0, 1]]}
    status, surprise = request(url, "POST", "/api/surprise", json.dumps(off))
    assert status == 200 and len(surprise["bits"]) == len(surprise["base_bits"]) == 13
    assert surprise["mean_bits"] != surprise["mean_base_bits"] and len(surprise["ids"]) == 14
    status, heads = request(url, "POST", "/api/heads", json.dumps({"text": "KING HENRY VI:\nWhat say you?"}))
    assert status == 200 and [len(row) for row in heads["heads"]] == [2]  # 1 layer x 2 heads
    assert {head["role"] for head in heads["heads"][0]} <= {*inside.ROLES, inside.SPREAD}
    for body, message in [
        ({"text": "KING", "off_heads": [[3, 0]]}, "head [3, 0] is not one of this GPT's 1 layers x 2 heads"),
        ({"text": "KING", "off_mlp": ["x"]}, "off_heads: [layer, head] pairs; off_attention and off_mlp"),
        ({"text": "KING", "off_attention": [0], "run": "bigram-plays/version_0"}, "it has no heads or blocks"),
        ({"text": "KING", "pos": 9}, "pos 9 is past the text's last position, 3"),
        ({"prompt": "KING", "off_heads": [[0, 2]]}, "head [0, 2] is not one of this GPT's 1 layers x 2 heads"),
    ]:
        path = "/api/lens" if "pos" in body else "/api/generate" if "prompt" in body else "/api/surprise"
        status, answer = request(url, "POST", path, json.dumps(body))
        assert status == 422 and message in answer["error"], answer


def test_the_page_shows_the_lens_the_heads_roles_and_what_a_head_switched_off_changes(page, url):
    page.fill("#prompt", "KING")
    page.fill("#max_new_tokens", "20")
    page.click("#generate")
    page.wait_for_selector("#output[data-state=done]")
    page.click("#output .tok.gen >> nth=10")  # within block_size: the lens reads what the generation read
    page.wait_for_function("document.querySelectorAll('#lens .row').length === 2")  # the embedding, 1 block
    candidates = page.locator("#candidates .row .char").all_text_contents()
    assert page.locator("#lens .row >> nth=1").locator(".chip").all_text_contents() == candidates[:5]
    page.wait_for_function("document.querySelector('#heads .role')?.textContent.length > 0")
    assert page.locator("#heads .role").count() == 2
    page.click("#heads figure >> nth=1")
    page.click("#switch-off")
    page.wait_for_function("document.querySelector('#ablation').textContent.length > 0")
    assert page.text_content("#ablation").startswith("layer 1, head 2 off: ")
    assert page.locator("#output .tok.harder, #output .tok.easier").count() == 4 + 20 - 1
    page.click("#generate-off")  # the same settings and seed, head 2 switched off: the server's text for them
    settings = {"prompt": "KING", "max_new_tokens": 20, "off_heads": [[0, 1]]}
    page.wait_for_function(f"document.querySelector('#beside').textContent.length === {4 + 20}")
    assert page.text_content("#beside") == text_of(stream(url, **settings))
    assert "with layer 1, head 2 off" in page.text_content("#beside-title")

    page.fill("#top_k", "3")  # the cut: the model's own ten, of which top-k keeps three
    page.click("#generate")
    page.wait_for_selector("#output[data-state=done]")
    page.click("#output .tok.gen >> nth=10")
    page.wait_for_function("document.querySelectorAll('#cut .row').length === 10")
    assert page.locator("#cut .row:not(.cut)").count() == 3 and page.locator("#cut .row.cut").count() == 7
    assert page.locator("#cut .row.drawn:not(.cut)").count() == 1 and "top-k 3" in page.text_content("#cut")


def test_the_page_reads_a_pasted_text_with_the_apis_surprise(page, url):
    text = "KING HENRY VI:\nWhat say you, sir?"
    page.fill("#prompt", text)
    page.click("#read")
    page.wait_for_selector("#output[data-state=done]")
    _, answer = request(url, "POST", "/api/surprise", json.dumps({"text": text}))
    assert page.text_content("#status").startswith(f"{answer['mean_bits']:.4f} bits per character over the 32")
    assert shown_text(page) == text
    page.click("#output .tok >> nth=5")
    page.wait_for_selector("#candidates .row")  # a read character's candidates: the lens's last row
    assert "Read, where the model gave it probability" in page.text_content("#candidates")


def test_the_page_on_a_phone_shows_a_tapped_characters_panel_and_says_what_it_did(browser, url):
    """A phone's narrow screen puts the panel under the text: a tap brings it into view. Greedy text says so, a
    finished generation says how long it took, and a bigram's size is in parameters, not "0.00M"."""
    phone = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    with open_page(phone, url) as page:
        page.fill("#temperature", "0")
        page.fill("#max_new_tokens", "40")
        page.click("#generate")
        page.wait_for_selector("#output[data-state=done]")
        assert re.fullmatch(r"done: 40 characters in [\d.]+ s", page.text_content("#status"))
        assert page.evaluate("document.querySelector('#inspect').getBoundingClientRect().top") > 844  # below
        page.tap("#output .tok.gen >> nth=5")
        page.wait_for_selector("#candidates .row")
        top = page.evaluate("document.querySelector('#inspect').getBoundingClientRect().top")
        assert -1 <= top < 844 / 2  # in view, its top at the top of the screen
        assert page.text_content("#candidates p").startswith("Greedy (temperature 0): the most likely, with")
        bigram = page.text_content("#run option[value='bigram-plays/version_0']")
        assert bigram.endswith("4,225 parameters") and "0.00M" not in bigram
    phone.close()


def test_the_page_shows_the_servers_message_for_a_bad_setting(page):
    page.fill("#temperature", "-1")
    page.click("#generate")
    page.wait_for_selector("#output[data-state=error]")
    assert page.text_content("#status") == "temperature -1 is outside [0, inf]"


def test_the_page_takes_its_settings_from_the_server_and_offers_one_it_has_no_field_for(browser, url):
    """The defaults and bounds come from GET /api/runs (none is typed in the page); a number setting that a newer
    server declares gets a field of its own, and its value is sent."""
    page = browser.new_page()

    def runs_with_one_more(route):
        answer = route.fetch().json()
        answer["settings"]["repetition_penalty"] = {"default": 1.0, "min": 1, "max": None, "above": False}
        route.fulfill(json=answer)

    sent = []
    page.route("**/api/runs", runs_with_one_more)
    page.route("**/api/generate", lambda route: (sent.append(route.request.post_data_json), route.fulfill(
        status=422, json={"error": "stopped here by the test"})))  # fmt: skip
    page.goto(url)
    page.wait_for_selector("#repetition_penalty")
    defaults = {f.name: f.default for f in dataclasses.fields(Sampling)}
    for name in ("max_new_tokens", "temperature", "seed"):
        assert float(page.input_value(f"#{name}")) == defaults[name]
    assert page.get_attribute("#top_p", "max") == "1" and page.get_attribute("#max_new_tokens", "max") == "100000"
    assert page.input_value("#repetition_penalty") == "1" and page.get_attribute("#repetition_penalty", "min") == "1"
    page.fill("#repetition_penalty", "1.3")
    page.click("#generate")
    page.wait_for_selector("#output[data-state=error]")
    assert sent[0]["repetition_penalty"] == 1.3 and sent[0]["temperature"] == defaults["temperature"]
    page.close()
