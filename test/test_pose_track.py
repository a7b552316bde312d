"""The pose track without DDS: poses at image stamps against poses worked out by hand."""

import math

import pytest

from livevlm_ros.engine.memory.poses import Pose
from livevlm_ros.ros.pose_track import PoseTrack

S = 1_000_000_000


def yaw(deg: float) -> tuple[float, float, float, float]:
    """The quaternion (x, y, z, w) of a rotation by `deg` about z: (0, 0, sin(deg/2), cos(deg/2))."""
    return 0.0, 0.0, math.sin(math.radians(deg) / 2), math.cos(math.radians(deg) / 2)


def close(got: Pose | None, want) -> bool:
    return got is not None and all(abs(g - w) < 1e-9 for g, w in zip(got, want))


def test_between_two_poses_position_is_linear_and_orientation_slerped():
    track = PoseTrack(max_gap_s=1.0)
    track.add(1 * S, Pose(0.0, 0.0, 0.0, *yaw(0)))
    track.add(2 * S, Pose(2.0, 4.0, 0.0, *yaw(90)))
    assert close(track.at(S + S // 2), (1.0, 2.0, 0.0, *yaw(45)))           # halfway: 45 degrees
    assert close(track.at(S + S // 4), (0.5, 1.0, 0.0, *yaw(22.5)))         # slerp is uniform in angle
    assert close(track.at(2 * S), (2.0, 4.0, 0.0, *yaw(90)))                # exactly a pose


def test_slerp_takes_the_shorter_way_round():
    track = PoseTrack(max_gap_s=1.0)
    track.add(1 * S, Pose(0.0, 0.0, 0.0, *yaw(170)))
    track.add(2 * S, Pose(0.0, 0.0, 0.0, *[-q for q in yaw(-170)]))        # -170 degrees, as -q
    got = track.at(S + S // 2)                                               # 20 degrees apart via 180
    assert close(got, (0.0, 0.0, 0.0, *yaw(180))) or close(got, (0.0, 0.0, 0.0, *[-q for q in yaw(180)]))


def test_never_guessed_across_a_gap_before_the_first_or_long_after_the_last():
    track = PoseTrack(max_gap_s=0.5)
    track.add(1 * S, Pose(0.0, 0.0, 0.0))
    track.add(2 * S, Pose(2.0, 0.0, 0.0))                   # 1 s apart: more than the gap
    assert track.at(S + S // 2) is None
    assert track.at(S // 2) is None                          # before the first pose
    assert close(track.at(2 * S + S // 5), (2.0, 0.0, 0.0, 0, 0, 0, 1))    # just after the newest: held
    assert track.at(2 * S + 3 * S // 5) is None              # past the gap: unknown, not extrapolated
    assert (track.counts.frames_with_pose, track.counts.frames_without_pose) == (1, 3)


def test_out_of_order_poses_find_their_place_and_a_jump_back_starts_over():
    track = PoseTrack(max_gap_s=1.0, jump_tolerance_s=1.0)
    assert track.add(2 * S, Pose(2.0, 0.0, 0.0)) == "kept"
    assert track.add(S + S // 2, Pose(1.0, 0.0, 0.0)) == "kept"            # half a second late: in place
    assert close(track.at(S + 3 * S // 4), (1.5, 0.0, 0.0, 0, 0, 0, 1))
    assert track.add(10 * S, Pose(10.0, 0.0, 0.0)) == "kept"
    assert track.add(1 * S, Pose(5.0, 5.0, 0.0)) == "jump"                  # the bag again: starts over
    assert track.counts.pose_time_jumps == 1 and track.newest == 1 * S
    assert close(track.at(S), (5.0, 5.0, 0.0, 0, 0, 0, 1))
    assert track.at(S // 2) is None                          # before the new timeline's first pose
    assert track.at(5 * S) is None                           # in the old track's 8 s gap: unknown


def test_a_frame_from_before_a_time_jump_ingested_after_it_finds_its_pose():
    """A worker busy while the bag looped ingests the last pass's frame after the poses jumped back:
    its stamp, far beyond the new timeline, is looked up in the track as it was before the jump."""
    track = PoseTrack(max_gap_s=1.0, jump_tolerance_s=1.0)
    for t in range(50, 61):
        track.add(t * S, Pose(float(t), 0.0, 0.0))
    for t in range(0, 3):                                     # the bag again
        track.add(t * S, Pose(-float(t), 1.0, 0.0))
    assert track.counts.pose_time_jumps == 1
    assert close(track.at(59 * S + S // 2), (59.5, 0.0, 0.0, 0, 0, 0, 1))  # the frame of the last pass
    assert close(track.at(1 * S), (-1.0, 1.0, 0.0, 0, 0, 0, 1))           # the new pass's own
    assert track.at(45 * S) is None                           # before the old track too: unknown
    track.add(49 * S, Pose(1.0, 2.0, 3.0))                    # the new pass reaches the old one's time:
    assert track.at(55 * S) is None                           # the old track is gone, nothing guessed
    assert close(track.at(49 * S), (1.0, 2.0, 3.0, 0, 0, 0, 1))


def test_after_a_jump_a_frame_just_past_the_newest_pose_holds_it_even_with_no_jump_tolerance():
    track = PoseTrack(max_gap_s=0.5, jump_tolerance_s=0.0)
    for t in range(10, 21):
        track.add(t * S, Pose(float(t), 0.0, 0.0))
    track.add(1 * S, Pose(1.0, 0.0, 0.0))                     # a jump back
    assert close(track.at(S + S // 5), (1.0, 0.0, 0.0, 0, 0, 0, 1))        # 0.2 s after: held, as without a jump
    assert close(track.at(15 * S), (15.0, 0.0, 0.0, 0, 0, 0, 1))           # the pass before the jump's


def test_unstamped_poses_are_refused_and_old_ones_forgotten():
    track = PoseTrack(max_gap_s=1.0, keep_s=10.0)
    assert track.add(0, Pose(1.0, 1.0, 1.0)) == "unstamped"
    assert track.newest is None and track.counts.poses_unstamped == 1
    for t in range(1, 31):
        track.add(t * S, Pose(float(t), 0.0, 0.0))
    assert track.at(5 * S) is None and close(track.at(25 * S), (25.0, 0.0, 0.0, 0, 0, 0, 1))


@pytest.mark.parametrize("bad", [(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0)])
def test_the_engine_pose_check_refuses_what_a_driver_can_send(bad):
    from livevlm_ros.engine.memory.poses import check_pose
    with pytest.raises(ValueError, match="unit quaternion"):
        check_pose(bad)
