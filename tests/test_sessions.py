"""Real-time sessions on sdxl_stream (serving/sessions.py): the session files in process (numbering, latest
wins, one frame at a time), and on the shared server a session sent faster than it answers: stale frames
answered as skipped, the newest never, every frame that ran equal to the same request alone; bad session ids
refused by name; the client's --session."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from helpers import metric
from reference import sample_image

from client import ClientError, generate, generate_session
from client.__main__ import main as client_main
from serving.endpoint import InvalidInput
from serving.sessions import SESSION_ID_MAX_BYTES, Sessions, check_session_id, frame_order

PROMPT = "a watercolor of a harbour"
FRAME = dict(num_inference_steps=2, strength=0.5, seed=9)


def test_frames_are_numbered_and_the_latest_wins(tmp_path):
    sessions = Sessions(tmp_path)
    first, second = sessions.arrive("a").number, sessions.arrive("a").number
    assert (first, second, sessions.arrive("b").number) == (1, 2, 1)
    assert sessions.wait_turn("a", first) is None  # superseded before it started
    turn = sessions.wait_turn("a", second)
    assert turn is not None
    third = sessions.arrive("a").number
    waited = {}

    def wait() -> None:  # the third frame waits while the second runs
        waited["turn"] = sessions.wait_turn("a", third)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.05)
    assert thread.is_alive()
    turn.release()
    thread.join(timeout=5)
    assert waited["turn"] is not None
    fourth = sessions.arrive("a").number
    waiting = threading.Thread(target=lambda: waited.update(fifth=sessions.wait_turn("a", fourth)))
    waiting.start()
    sessions.arrive("a")  # a newer frame: the waiting one is answered at once, not after the running one
    waiting.join(timeout=1)
    assert not waiting.is_alive() and waited["fifth"] is None
    waited["turn"].release()


def test_the_clients_order_wins_over_the_order_frames_reach_the_sessions(tmp_path):
    """The stream's instances check frames in parallel: the client's frame 7 can reach the session before its
    frame 6. By the request ids, 7 is still the newest and 6 is stale from the start; once no frame of the
    session is left, a client that reuses the id numbers from 0 again."""
    sessions = Sessions(tmp_path)
    assert [frame_order(text) for text in ("0", "7", "x7", "-1", "", "٣", "9" * 19)] == [0, 7, None, None, None, None, None]
    seventh = sessions.arrive("a", 7)
    sixth = sessions.arrive("a", 6)
    assert sessions.wait_turn("a", sixth.number) is None
    turn = sessions.wait_turn("a", seventh.number)
    assert turn is not None and sessions.latest("a") == 7
    without_order = sessions.arrive("a")  # a request id that is not a number: the newest, by arrival
    assert without_order.number == 8
    for frame in (sixth, seventh, without_order):
        frame.leave()
    turn.release()
    again = sessions.arrive("a", 0)  # a new stream on the same id: none of the session is left
    assert sessions.latest("a") == 0
    sessions.wait_turn("a", again.number).release()
    again.leave()


@pytest.mark.parametrize("value", [b"", b"x" * (SESSION_ID_MAX_BYTES + 1), b"\xff\xfe"])
def test_bad_session_ids_are_refused_by_name(value):
    with pytest.raises(InvalidInput, match="^session_id: "):
        check_session_id(np.array([value], dtype=object))
    assert check_session_id(None) is None and check_session_id(np.array([b"painter-1"], dtype=object)) == "painter-1"


def test_a_session_faster_than_the_server_skips_stale_frames(triton):
    """Eight frames sent at once: the server runs one at a time, skips the frames a newer one superseded
    before they started, never the newest; each frame that ran equals the same request sent alone."""
    frames = [sample_image(128, 128, seed=20 + index) for index in range(8)]
    skipped_before = metric(triton, "sdxl_stream_frames_skipped_total")
    answers = {frame.index: frame for frame in generate_session(({"image": image} for image in frames), url=triton.grpc_url,
                                                                prompt=PROMPT, **FRAME)}
    assert sorted(answers) == list(range(8))
    skipped = [index for index, frame in answers.items() if frame.skipped]
    assert skipped and 7 not in skipped and answers[7].images is not None
    assert metric(triton, "sdxl_stream_frames_skipped_total") == skipped_before + len(skipped)
    assert all(answers[index].seconds < answers[7].seconds for index in skipped)  # answered before the newest
    for index, frame in answers.items():
        if not frame.skipped:
            alone = generate(PROMPT, url=triton.grpc_url, protocol="grpc", image=frames[index], **FRAME)
            assert np.array_equal(frame.images, alone.images), index


def test_a_session_paced_slower_than_the_server_skips_nothing(triton):
    def paced():
        for index in range(3):
            yield {"image": sample_image(128, 128, seed=40 + index)}
            time.sleep(1.5)  # a frame takes a fraction of that here

    answers = list(generate_session(paced(), url=triton.grpc_url, prompt=PROMPT, **FRAME))
    assert [frame.skipped for frame in answers] == [False] * 3


def test_a_bad_session_id_is_refused_on_the_stream(triton):
    with pytest.raises(ClientError, match="session_id"):
        list(generate_session([{"image": sample_image(128, 128)}], url=triton.grpc_url, prompt=PROMPT,
                              session_id="x" * (SESSION_ID_MAX_BYTES + 1), **FRAME))


def test_the_client_streams_a_directory_of_frames(triton, tmp_path, capsys):
    from PIL import Image

    source = tmp_path / "frames"
    source.mkdir()
    for index in range(3):
        Image.fromarray(sample_image(128, 128, seed=60 + index)).save(source / f"{index:03d}.png")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT)
    out = tmp_path / "out"
    assert client_main(["--session", str(source), "--prompt-file", str(prompt_file), "--fps", "2", "--steps", "2",
                        "--seed", "9", "--url", triton.grpc_url, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fps, latency median" in printed and "skipped" in printed
    written = sorted(out.glob("frame_*.png"))
    assert written and written[-1].name == "frame_00002.png"
