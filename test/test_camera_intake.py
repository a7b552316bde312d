"""Camera intake without DDS: sampling by header stamp, camera sync, time jumps per camera, the
ring that keeps only what sampling needs. Sequences, not single faults."""

import pytest

from livevlm_ros.ros.camera_intake import NS, CameraIntake
from livevlm_ros.ros.work_queue import QueryJob, WorkQueue

FRONT, REAR = "/front", "/rear"


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def params(**over):
    p = dict(sample_fps=1.0, camera_sync_slop_s=0.1, camera_sync_wait_s=0.5, stale_camera_s=5.0,
             time_jump_tolerance_s=1.0, on_time_jump="reset", frame_queue_size=4, max_pending_queries=4,
             fresh_wait_s=1.0)
    p.update(over)
    return p


def ns(seconds: float) -> int:
    return round(seconds * NS)


def test_samples_follow_camera_time_and_the_queue_drops_the_oldest():
    intake = CameraIntake([FRONT], params(frame_queue_size=2), clock=Clock())
    outcomes = [intake.offer(FRONT, ns(100 + 0.25 * i), f"m{i}") for i in range(13)]    # 4 Hz for 3 s
    assert outcomes.count("sampled") == 4                                               # 100, 101, 102, 103
    assert [s.stamp for s in intake.queue] == [ns(102), ns(103)]
    assert intake.counts.frames_dropped == 2 and intake.counts.frames_received == 13


def test_two_cameras_on_different_clocks_are_not_a_time_jump():
    """Front stamps bag time ~100 s, rear stamps ~5 s (its own clock): judged per camera, neither
    jumps; the rear one never makes a sample due and is reported behind by ~95 s."""
    intake = CameraIntake([FRONT, REAR], params(), clock=Clock())
    outcomes = []
    for i in range(20):
        outcomes.append(intake.offer(FRONT, ns(100 + 0.5 * i), "f"))
        outcomes.append(intake.offer(REAR, ns(5 + 0.5 * i), "r"))
    assert "jump" not in outcomes and intake.counts.time_jumps == 0
    assert all(FRONT in s.frames and REAR not in s.frames for s in intake.queue)
    assert intake.clock_offsets()[REAR] == pytest.approx(95.0)


def test_a_jump_of_one_camera_resets_and_the_stream_goes_on():
    intake = CameraIntake([FRONT], params(), clock=Clock())
    for t in (100, 101, 102):
        intake.offer(FRONT, ns(t), "a")
    assert intake.offer(FRONT, ns(1.0), "b") == "jump"                  # the bag again
    assert [s.stamp for s in intake.queue] == [ns(1.0)]                 # the old stream's samples are gone
    assert intake.offer(FRONT, ns(2.0), "c") == "sampled"
    assert intake.counts.time_jumps == 1 and intake.last_jump(FRONT) == (ns(102), ns(1.0))


def test_refuse_drops_a_jumped_camera_until_it_passes_its_old_stamps():
    intake = CameraIntake([FRONT], params(on_time_jump="refuse"), clock=Clock())
    for t in (100, 101):
        intake.offer(FRONT, ns(t), "a")
    assert [intake.offer(FRONT, ns(t), "b") for t in (1.0, 50.0, 101.0)] == ["refused"] * 3
    assert intake.offer(FRONT, ns(102.0), "c") == "sampled"
    assert intake.counts.frames_refused_time == 3 and intake.counts.time_jumps == 1


def test_stamp_zero_is_refused_and_named_never_sampled():
    intake = CameraIntake([FRONT, REAR], params(), clock=Clock())
    assert intake.offer(REAR, 0, "r") == "unstamped"
    assert intake.offer(FRONT, ns(100), "f") == "sampled"
    assert intake.offer(REAR, 0, "r") == "unstamped"
    assert intake.unstamped() == [REAR] and intake.counts.frames_unstamped == 2
    assert REAR not in intake.queue[0].frames
    intake.offer(REAR, ns(100.01), "r")                                 # the driver is fixed
    assert intake.unstamped() == [] and REAR in intake.queue[0].frames


def test_a_sample_waits_for_the_other_camera_but_not_longer_than_the_sync_wait():
    clock = Clock()
    intake = CameraIntake([FRONT, REAR], params(), clock=clock)
    intake.offer(FRONT, ns(100), "f")
    kind, wait = intake.take()
    assert kind == "wait" and wait == pytest.approx(0.5)
    intake.offer(REAR, ns(100.03), "r")                                 # its frame of the instant comes
    kind, sample = intake.take()
    assert kind == "sample" and set(sample.frames) == {FRONT, REAR}
    intake.offer(FRONT, ns(101), "f")                                   # now the rear camera is late ...
    clock.t = 0.6                                                       # ... beyond the wait
    kind, sample = intake.take()
    assert kind == "sample" and set(sample.frames) == {FRONT}


def test_the_ring_keeps_only_frames_a_sample_can_still_take():
    intake = CameraIntake([FRONT, REAR], params(camera_sync_slop_s=0.1), clock=Clock())
    for i in range(300):                                                # 30 Hz for 10 s
        intake.offer(FRONT, ns(100 + i / 30), "f")
        intake.offer(REAR, ns(100 + i / 30 + 0.01), "r")
    assert max(len(c.recent) for c in intake.cameras.values()) <= 4


def test_a_jump_in_the_work_queue_clears_memory_once_and_frees_waiting_questions():
    intake = CameraIntake([FRONT], params(), clock=Clock())
    work = WorkQueue(intake, intake.p)
    work.reopen()
    for t in (100, 101):
        work.offer_frame(FRONT, ns(t), "a")
    job = QueryJob("What now?", 4)
    assert work.add_query(job) is None and job.fresh_after == ns(101)
    assert work.offer_frame(FRONT, ns(1.0), "b") == "jump"
    assert work.reset_due and job.fresh_after is None
    kind, got, changes, reset = work.next_job(lambda: True)
    assert (kind, got, reset) == ("query", job, True)                  # memory cleared before it is answered
    kind, sample, _, reset = work.next_job(lambda: True)
    assert kind == "sample" and sample.stamp == ns(1.0) and not reset


def test_a_narration_slower_than_its_period_does_not_starve_ingest():
    """Narration is due again by the time the last one ends: samples waiting still go between them."""
    intake = CameraIntake([FRONT], params(), clock=Clock())
    work = WorkQueue(intake, intake.p)
    work.reopen()
    for t in (100, 101, 102):
        work.offer_frame(FRONT, ns(t), "a")
    picked = []
    for _ in range(6):
        work.request(narration=True)                                    # due again at once
        picked.append(work.next_job(lambda: True)[0])
    assert picked == ["narration", "sample", "narration", "sample", "narration", "sample"]
    work.request(narration=True)
    assert work.next_job(lambda: True)[0] == "narration"                  # nothing waits: narrate


def test_closing_the_queue_hands_back_every_waiting_job_and_refuses_with_the_reason():
    intake = CameraIntake([FRONT], params(), clock=Clock())
    work = WorkQueue(intake, intake.p)
    work.reopen()
    jobs = [QueryJob(f"q{i}", 4) for i in range(3)]
    assert [work.add_query(j) for j in jobs] == [None] * 3
    queries, control = work.close("deactivated")
    assert queries == jobs and control == []
    assert work.add_query(QueryJob("late", 4)) == "deactivated"
