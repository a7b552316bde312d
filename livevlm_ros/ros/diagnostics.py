"""What /diagnostics says about the node: one DiagnosticStatus, its level, message and counters.

ERROR when the engine could not start, the worker thread stopped, or the last job failed (the
message says which); otherwise WARN with every warning, worst first, joined by "; " (a memory file
refused, not active, loading, a camera silent, unstamped (stamp 0) or on another clock, the engine
lagging or dropping samples); OK "ready" when there is none.
"""

from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


def report(core) -> tuple[int, str, dict]:
    """(level, message, values) for a LiveVLMCore (core.py)."""
    p, work, worker, servers = core.p, core.work, core.worker, core.servers
    values: dict = {"state": core.state,
                    "engine": "ready" if worker else "failed" if core.engine_error else
                              "loading" if core.loading else "unconfigured",
                    "worker_alive": bool(worker and worker.alive()),
                    "answering": bool(worker and worker.answering()),
                    "worker_doing": worker.doing if worker else "nothing",   # a sample taken off the queue shows here
                    "callback_errors": core.callback_errors}
    if work is not None:
        with work.lock:
            intake = work.intake
            values.update(vars(intake.counts))
            values.update(frames_queued=len(intake.queue), queries_queued=len(work.queries))
            newest, ingested = intake.newest, work.last_ingested
            silent, offsets, unstamped = intake.seconds_silent(), intake.clock_offsets(), intake.unstamped()
    else:
        newest = ingested = None
        silent, offsets, unstamped = {}, {}, []
    if worker is not None:
        counts = dict(vars(worker.counts))
        misses = counts.pop("camera_misses")
        values.update(counts)
        # the engine's own counts start again after a memory reset; the node's are cumulative
        values.update({(f"memory_{k}" if k in values else k): v for k, v in worker.stats.items() if k != "stream_span"})
    else:
        misses = {}
    if servers is not None:
        values["queries_refused"] = values.get("queries_refused", 0) + servers.refused
        values.update(queries_timed_out=servers.timeouts, goals_cancelled=servers.cancels)
    # both in camera time: how far the engine is behind the newest frame it was offered
    values["lag_s"] = None if newest is None or ingested is None else round(max(0.0, (newest - ingested) / 1e9), 3)
    for topic, seconds in silent.items():            # per camera: one that stops is named
        values[f"seconds_since_frame[{topic}]"] = round(seconds, 1)
        values[f"samples_missed[{topic}]"] = misses.get(topic, 0)
        if topic in offsets:
            values[f"stamp_behind_s[{topic}]"] = round(offsets[topic], 3)

    if core.engine_error:
        return ERROR, f"engine failed to start: {core.engine_error}", values
    if worker is not None and core.serving and not worker.alive():
        return ERROR, "the engine worker stopped: no frame or question is served (restart the node)", values
    if worker is not None and worker.last_error:
        return ERROR, worker.last_error, values
    warnings = []                                       # every one, worst first
    if core.memory_file_error:
        warnings.append(core.memory_file_error)
    if core.state != "active":
        warnings.append(f"{core.state} (managed node)")
    if worker is None and core.state != "unconfigured":
        warnings.append("loading the model")
    stale = [f"{t} ({s:.1f} s)" for t, s in silent.items() if s > p["stale_camera_s"]]
    if stale and core.state == "active":
        warnings.append(f"no frame from camera {', '.join(stale)}")
    if unstamped:
        warnings.append(f"camera {', '.join(unstamped)} sends header stamp 0 (its driver does not stamp images): "
                        "its frames are refused")
    other_clock = [f"{t} ({s:.1f} s)" for t, s in offsets.items() if s > p["time_jump_tolerance_s"] + 1.0 / p["sample_fps"]
                   and silent.get(t, 0.0) < p["stale_camera_s"]]
    if other_clock:
        warnings.append(f"camera {', '.join(other_clock)} stamps lie behind the newest camera's: another clock? "
                        "its frames join no sample")
    if core.poses is not None:
        pose_values, pose_warning = core.poses.status(p["stale_camera_s"])
        values.update(pose_values)
        if pose_warning and core.state == "active":
            warnings.append(pose_warning)
    if values["lag_s"] is not None and values["lag_s"] > p["max_lag_s"]:
        warnings.append(f"engine {values['lag_s']:.1f} s behind the camera")
    dropped = values.get("frames_dropped", 0) - core.dropped_reported
    core.dropped_reported = values.get("frames_dropped", 0)
    if dropped:
        warnings.append(f"engine behind: {dropped} sampled frames dropped since the last report")
    if warnings:
        return WARN, "; ".join(warnings), values
    return OK, "ready", values


def message(core) -> DiagnosticArray:
    level, text, values = report(core)
    status = DiagnosticStatus(level=level, name=f"{core.node.get_fully_qualified_name()}: engine",
                              hardware_id=core.p["device"], message=text,
                              values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
    array = DiagnosticArray(status=[status])
    array.header.stamp = core.node.get_clock().now().to_msg()
    return array

