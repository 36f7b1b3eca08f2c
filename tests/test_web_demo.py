"""The ``/demo`` page of `mm serve` in a real browser: headless Chromium driven by selenium.

One test picks a generated WAV through the page's file input; the page converts it to 16 kHz mono
WAV, sends an ``input_audio`` request asking for a spoken answer, shows the answer and gives the
audio element the spoken WAV. Another records from the microphone: Chromium's fake capture device
plays a generated tone into ``getUserMedia``, the page records it with ``MediaRecorder`` (webm/opus,
lossy), converts it and asks. Selenium talks to the system's chromedriver (no driver download).
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
import soundfile as sf
from test_server import MODEL_ID, RunningServer
from test_speech_server import LIMITS, save_speech_model, wav

from mm import MultimodalModel
from mm.demo.speech import TASK_PROMPTS
from mm.model.chat import chat
from mm.serving.app import create_app
from mm.serving.speech_out import TTS_SAMPLE_RATE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="headless Chromium is not installed (apt-get install chromium chromium-driver)",
)


def _chromium(*flags: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", *flags):
        options.add_argument(flag)
    options.add_argument("--autoplay-policy=no-user-gesture-required")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = _chromium()
    yield driver
    driver.quit()


MIC_HZ = 660.0  # the tone the fake microphone plays


@pytest.fixture(scope="module")
def mic_browser(tmp_path_factory):
    """Chromium whose microphone is a fake device playing a WAV file (permission granted)."""
    tone = tmp_path_factory.mktemp("mic") / "tone.wav"
    tone.write_bytes(wav(MIC_HZ, seconds=2.0, rate=48000))
    driver = _chromium(
        "--use-fake-ui-for-media-stream",  # grants the microphone without a prompt
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={tone}",
    )
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_server(speech_model_dir):
    app = create_app(
        MultimodalModel.from_pretrained(speech_model_dir).eval(), model_id=MODEL_ID, limits=LIMITS
    )
    running = RunningServer(app)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def speech_model_dir(tmp_path_factory):
    return save_speech_model(tmp_path_factory.mktemp("page") / "model")


def test_the_page_answers_a_picked_file_and_plays_the_spoken_answer(
    browser, page_server, speech_model_dir, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    raw = wav(440.0, seconds=0.9)  # 16 kHz mono: the page sends it sample for sample
    (tmp_path / "question.wav").write_bytes(raw)
    browser.get(f"http://127.0.0.1:{page_server.port}/demo")
    assert browser.find_element(By.ID, "model").text == MODEL_ID
    # the prompt box offers the demo's task prompts (recognition and translation)
    offered = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#prompts option")]
    assert offered == list(TASK_PROMPTS.values())
    browser.find_element(By.ID, "prompt").send_keys("Repeat after me in English.")
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "question.wav"))
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "answer").text or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    shown = browser.find_element(By.ID, "answer").get_attribute("textContent")

    ref = MultimodalModel.from_pretrained(speech_model_dir).eval()
    parts = [{"type": "text", "text": "Repeat after me in English."}, {"type": "audio", "audio": raw}]
    assert shown == chat(ref, [{"role": "user", "content": parts}], max_new_tokens=LIMITS.max_tokens)

    src = browser.find_element(By.ID, "answer-audio").get_attribute("src")
    assert src.startswith("data:audio/wav;base64,")
    samples, rate = sf.read(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert rate == TTS_SAMPLE_RATE and samples.shape[0] > 0


def test_the_page_shows_the_servers_error_for_a_file_it_cannot_use(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    (tmp_path / "long.wav").write_bytes(wav(300.0, seconds=4.0))  # over the model's 3 s cap
    browser.get(f"http://127.0.0.1:{page_server.port}/demo")
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "long.wav"))
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").text)
    assert "max_seconds" in browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "answer").text == ""
    assert page_server.healthy()


# Records what the page sends, so the test can ask the reference model the same thing.
_KEEP_REQUESTS = """
window.sentBodies = [];
const realFetch = window.fetch;
window.fetch = (url, init) => { window.sentBodies.push(init.body); return realFetch(url, init); };
"""


def test_the_page_records_from_the_microphone_and_answers(mic_browser, page_server, speech_model_dir):
    import json
    import time

    import numpy as np
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = mic_browser
    browser.get(f"http://127.0.0.1:{page_server.port}/demo")
    browser.execute_script(_KEEP_REQUESTS)
    assert browser.find_element(By.ID, "stop").get_attribute("disabled")
    browser.find_element(By.ID, "record").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "stop").is_enabled() or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    assert "recording" in browser.find_element(By.ID, "status").text
    time.sleep(1.2)
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: d.find_element(By.ID, "answer").text or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    assert browser.find_element(By.ID, "record").is_enabled()
    shown = browser.find_element(By.ID, "answer").get_attribute("textContent")

    # The request carried the recording: 16 kHz mono 16-bit WAV, about as long as the recording,
    # and the fake microphone's tone is its strongest frequency.
    bodies = browser.execute_script("return window.sentBodies;")
    assert len(bodies) == 1
    (part,) = [p for p in json.loads(bodies[0])["messages"][0]["content"] if p["type"] == "input_audio"]
    sent = base64.b64decode(part["input_audio"]["data"])
    info = sf.info(io.BytesIO(sent))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    samples, _ = sf.read(io.BytesIO(sent), dtype="float32")
    assert 0.5 < samples.shape[0] / 16000 < 3.0
    spectrum = np.abs(np.fft.rfft(samples))
    peak_hz = np.argmax(spectrum) * 16000 / samples.shape[0]
    assert abs(peak_hz - MIC_HZ) < 10, peak_hz

    # The answer shown is the model's answer to exactly that audio.
    ref = MultimodalModel.from_pretrained(speech_model_dir).eval()
    parts = [{"type": "audio", "audio": sent}]
    assert shown == chat(ref, [{"role": "user", "content": parts}], max_new_tokens=LIMITS.max_tokens)
    src = browser.find_element(By.ID, "answer-audio").get_attribute("src")
    assert src.startswith("data:audio/wav;base64,")
