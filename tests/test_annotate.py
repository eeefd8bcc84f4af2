"""`jaxdpo annotate`: the server's rules over HTTP (one answer per pair however many clients race,
undo, state only from the files, refused cross-site posts, one-line errors), then a real headless
chromium labeling a real run's round by keyboard — reload, undo, a killed and restarted server,
two tabs — and `--resume` training on exactly those labels."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jaxdpo import experiment
from jaxdpo.annotate import Conflict, LabelQueue, left_response, make_server
from jaxdpo.annotate.queue import preferred
from jaxdpo.cli import EXIT_LABELS_PENDING, EXIT_USER_ERROR, main
from jaxdpo.oracles import HumanOracle, LabelsPending, PairRequest, read_answers
from jaxdpo.oracles.human import human_folder
from tests.test_loop import TINY, write_toml

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = '<script>window.injected = true</script><b>bold</b> & "quoted"\n  second line'


def pair_ids(n: int) -> list[str]:
    """The ids of the first n picks of round 1 of track random-seed0."""
    return [experiment.Track("random", 0).request_id(1, pick) for pick in range(n)]


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """A run folder waiting for 4 labels (the request file as the human oracle writes it)."""
    oracle = HumanOracle(human_folder(tmp_path / "run"))
    requests = [PairRequest(i, "random-seed0", 1, f"prompt {n} {HOSTILE}", f"answer a{n}", f"answer b{n}") for n, i in enumerate(pair_ids(4))]
    with pytest.raises(LabelsPending):
        oracle.label(requests)
    oracle.submit_pending()
    return tmp_path / "run"


def labels_file(out: Path) -> Path:
    [(_, labels)] = HumanOracle(human_folder(out)).batches()
    return labels


def answer_lines(out: Path) -> list[dict]:
    path = labels_file(out)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@contextlib.contextmanager
def serving(out: Path, port: int = 0):
    """`jaxdpo annotate` in this process, on a thread; yields its base URL."""
    server = make_server(out, port)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def call(url: str, path: str, body: dict | None = None, **headers) -> tuple[int, dict]:
    """(status, JSON reply) of a GET (no body) or a JSON POST."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_sides_are_a_fair_coin_per_pair_and_answers_are_in_a_b_terms(out_dir):
    lefts = [left_response(f"pair-{i}") for i in range(400)]
    assert lefts == [left_response(f"pair-{i}") for i in range(400)] and 160 < lefts.count("a") < 240
    assert [preferred(c, "b") for c in ("left", "right", "tie", "skip")] == ["b", "a", "tie", "skip"]
    first = pair_ids(4)[0]
    left = left_response(first)
    with serving(out_dir) as url:
        status, reply = call(url, "/api/state")
        assert status == 200 and (reply["state"]["done"], reply["state"]["total"]) == (0, 4)
        assert reply["state"]["pair"]["left"] == f"answer {left}0" and reply["state"]["pair"]["right"] != f"answer {left}0"
        status, reply = call(url, "/api/choice", {"id": first, "choice": "right"})
    assert status == 200 and reply["state"]["pair"]["id"] == pair_ids(4)[1] and reply["state"]["done"] == 1
    [line] = answer_lines(out_dir)
    assert (line["id"], line["preferred"], line["left"]) == (first, preferred("right", left), left)


def test_a_pair_is_answered_once_however_many_clients_race(out_dir):
    first, second = pair_ids(2)
    with serving(out_dir) as one, serving(out_dir) as other:  # two servers on one run, four clients each
        barrier = threading.Barrier(8)

        def choose(url: str, choice: str) -> tuple[int, dict]:
            barrier.wait()
            return call(url, "/api/choice", {"id": first, "choice": choice})

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: choose((one, other)[i % 2], ("left", "right", "tie", "skip")[i % 4]), range(8)))
    assert sorted(status for status, _ in results) == [200] + [409] * 7
    assert all(reply["state"]["pair"]["id"] == second for _, reply in results)
    assert [line["id"] for line in answer_lines(out_dir)] == [first]


def test_undo_withdraws_the_newest_current_choice_then_the_one_before(out_dir):
    first, second = pair_ids(2)
    with serving(out_dir) as url:
        call(url, "/api/choice", {"id": first, "choice": "left"})
        call(url, "/api/choice", {"id": second, "choice": "tie"})
        assert call(url, "/api/choice", {"id": first, "choice": "right"})[0] == 409  # answered: refused, not recorded
        status, reply = call(url, "/api/undo", {})
        assert status == 200 and reply["undone"] == second and reply["state"]["pair"]["id"] == second
        assert call(url, "/api/undo", {})[1]["undone"] == first
        status, reply = call(url, "/api/undo", {})
        assert status == 409 and "no choice to undo" in reply["error"]
        assert call(url, "/api/choice", {"id": first, "choice": "skip"})[0] == 200
        assert call(url, "/api/choice", {"id": "random-seed0-round009-pick000", "choice": "left"})[0] == 409
        assert call(url, "/api/choice", {"id": second, "choice": "better"})[0] == 400
        assert call(url, "/api/choice", {"id": 3})[0] == 400
    assert [(r.get("preferred"), r.get("undo")) for r in answer_lines(out_dir)] == [
        (preferred("left", left_response(first)), None), ("tie", None), (None, True), (None, True), ("skip", None)
    ]
    assert {i: a["preferred"] for i, a in read_answers(labels_file(out_dir), pair_ids(4)).items()} == {first: "skip"}


def test_only_this_page_on_this_host_may_post(out_dir):
    first = pair_ids(1)[0]
    with serving(out_dir) as url:
        port = url.rsplit(":", 1)[1]
        assert call(url, "/api/choice", {"id": first, "choice": "left"}, **{"Content-Type": "text/plain"})[0] == 403
        assert call(url, "/api/choice", {"id": first, "choice": "left"}, Origin="http://evil.example")[0] == 403
        assert call(url, "/api/choice", {"id": first, "choice": "left"}, Host=f"evil.example:{port}")[0] == 403
        assert call(url, "/api/state", Host=f"evil.example:{port}")[0] == 403
        assert call(url, "/api/choice", {"id": first, "choice": "left"}, Origin=url)[0] == 200
    assert len(answer_lines(out_dir)) == 1


def test_a_killed_server_loses_nothing(out_dir):
    first, second = pair_ids(2)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "jaxdpo.cli", "annotate", str(out_dir), "--port", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert f"4 pairs to label: open http://127.0.0.1:{port}/" in server.stderr.readline()
        assert call(f"http://127.0.0.1:{port}", "/api/choice", {"id": first, "choice": "left"})[0] == 200
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    assert LabelQueue(out_dir).state()["pair"]["id"] == second and len(answer_lines(out_dir)) == 1


def test_bad_input_is_a_one_line_error(out_dir, tmp_path, capsys):
    def error_of(*argv: str) -> str:
        assert main(["annotate", *argv]) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("error: ")
        return err

    assert "holds no label requests" in error_of(str(tmp_path / "elsewhere"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert "choose another port with --port" in error_of(str(out_dir), "--port", str(taken.getsockname()[1]))
    labels_file(out_dir).write_text("".join(json.dumps({"id": i, "preferred": "a"}) + "\n" for i in pair_ids(4)))
    assert f"is labeled; continue the run with: jaxdpo run CONFIG --resume --out {out_dir}" in error_of(str(out_dir))


# -- in a real browser ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian chromium through its chromedriver, one per module."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield chrome
    chrome.quit()


class Page:
    """One browser tab on the labeling page, driven by keyboard."""

    def __init__(self, browser, handle: str):
        self.browser, self.handle = browser, handle

    def text(self, element_id: str) -> str:
        self.browser.switch_to.window(self.handle)
        return self.browser.execute_script("return document.getElementById(arguments[0]).textContent", element_id)

    def press(self, key: str) -> None:
        """Press a character, or a key named as in selenium's `Keys` ("ARROW_LEFT")."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        self.browser.switch_to.window(self.handle)
        ActionChains(self.browser).send_keys(getattr(Keys, key, key)).perform()

    def shows(self, progress: str, pair_id: str | None) -> None:
        """Wait until the page shows `progress` and the pair (None: the finished screen)."""
        from selenium.webdriver.support.ui import WebDriverWait

        def showing(_) -> bool:
            finished = self.browser.execute_script("return !document.getElementById('finished').hidden")
            current = None if finished else self.text("pair-id").split(" ")[0]
            return self.text("progress") == progress and current == pair_id

        self.browser.switch_to.window(self.handle)
        WebDriverWait(self.browser, 10).until(showing, f"expected {progress} and {pair_id}, got {self.text('progress')} and {self.text('pair-id')}")


def open_page(browser, url: str, *, new_tab: bool = False) -> Page:
    if new_tab:
        browser.switch_to.new_window("tab")
    browser.get(url)
    return Page(browser, browser.current_window_handle)


def test_page_shows_texts_as_text_side_by_side(out_dir, browser):
    first = pair_ids(1)[0]
    left = left_response(first)
    with serving(out_dir) as url:
        page = open_page(browser, url)
        page.shows("0 / 4", first)
        assert page.text("prompt") == f"prompt 0 {HOSTILE}" and browser.execute_script("return window.injected") is None
        assert (page.text("left"), page.text("right")) == (f"answer {left}0", f"answer {'ab'[left == 'a']}0")
        keys = page.text("labeling")
        assert all(key in keys for key in ("←", "→", "T", "S", "U", "undo the last choice"))


@pytest.fixture(scope="module")
def waiting_run(tmp_path_factory) -> tuple[Path, Path]:
    """(config, --out) of a run of one track and one round of 4 pairs, stopped waiting for labels.
    An untrained model's texts serve as well as a trained one's here (and save the SFT)."""
    from jaxdpo import embedded
    from jaxdpo.models import save_pretrained

    root = tmp_path_factory.mktemp("annotate")
    embedded.build_tokenizer().save_pretrained(save_pretrained(embedded.train_sft(steps=0), root / "run" / "sft-model"))
    config = {**TINY, "run": {"methods": ["random"], "seeds": [0], "rounds": 1}, "oracle": {"kind": "human"}, "dpo": {"epochs": 1, "batch_size": 4}}
    path = write_toml(root / "human.toml", config)
    assert main(["run", str(path), "--out", str(root / "run")]) == EXIT_LABELS_PENDING
    return path, root / "run"


def test_the_page_gives_the_whole_resume_command(waiting_run):
    config, out = waiting_run
    assert LabelQueue(out).state()["resume"] == f"jaxdpo run {config.resolve()} --resume --out {out}"


def test_labeling_a_round_in_the_browser_then_resume(waiting_run, browser):
    config, out = waiting_run
    ids = pair_ids(4)
    port = free_port()
    with serving(out, port) as url:
        tab = open_page(browser, url)
        tab.shows("0 / 4", ids[0])
        tab.press("ARROW_LEFT")
        tab.shows("1 / 4", ids[1])
        browser.refresh()
        tab.shows("1 / 4", ids[1])
        tab.press("2")
        tab.shows("2 / 4", ids[2])
        tab.press("u")  # undo: back to the pair just answered
        tab.shows("1 / 4", ids[1])
        tab.press("t")
        tab.shows("2 / 4", ids[2])
    with serving(out, port) as url:  # a new server: it knows only the files
        other = open_page(browser, url, new_tab=True)
        other.shows("2 / 4", ids[2])
        other.press("ARROW_RIGHT")
        other.shows("3 / 4", ids[3])
        tab.press("1")  # the first tab still shows the pair the other one answered: refused, next pair shown
        tab.shows("3 / 4", ids[3])
        assert "labeled meanwhile" in tab.text("message")
        tab.press("s")
        tab.shows("4 / 4", None)
        assert tab.text("resume") == f"jaxdpo run {config.resolve()} --resume --out {out}"  # the command to paste, config file included
        other.press("BACKSPACE")  # in the tab still showing pair 3: undoes the skip made in the first
        other.shows("3 / 4", ids[3])
        other.press("ARROW_LEFT")
        other.shows("4 / 4", None)
    chosen = {ids[0]: "left", ids[1]: "tie", ids[2]: "right", ids[3]: "left"}
    answers = read_answers(labels_file(out), ids)
    assert {i: (a["preferred"], a["left"]) for i, a in answers.items()} == {
        i: (preferred(choice, left_response(i)), left_response(i)) for i, choice in chosen.items()
    }
    assert len(answer_lines(out)) == 8  # 6 choices and 2 undos: nothing recorded twice

    assert main(["run", str(config), "--out", str(out), "--resume"]) == 0
    labels = experiment.read_labels(out / experiment.LABELS)
    expected = [preferred(chosen[i], left_response(i)) for i in ids]
    assert [r.preferred for r in labels] == [None if e == "tie" else e for e in expected]
    with pytest.raises(Conflict, match="already collected"):  # the run trained on it: no undo now
        LabelQueue(out).undo()
