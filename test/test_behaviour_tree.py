"""Behaviour-tree leaves (livevlm_ros.behaviours) ticked in real py_trees trees against the node in
its own process over DDS: the example tree on the demo model and demo bag gives the demo's ground
truth, a parallel branch that preempts Ask cancels its goal and frees the engine, 20 trees at 10 Hz
against one node all end, FreshView needs a frame taken after the decision point.

Two nodes are started: the demo node (root namespace, /camera/image_raw, fed the demo bag once for
the module) and, per test, a tiny-model node under /tiny (its own camera topic), so frames published
for one never reach the other. Every tree is ticked at 10 Hz from a timer on the test's client node.
"""

import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import py_trees
import pytest
import yaml

from ros_harness import Client, NodeProcess, executable, node_params, start  # noqa: F401,I100 (domain first; fixture)
from livevlm_ros.behaviours import Ask, Check, FreshView, StatusLines, TreeTicker, verdict
from livevlm_ros.behaviours.example_tree import DOOR_QUESTION, TOOLBOX_QUESTION, find_the_toolbox
from livevlm_ros.tools import synthetic_world as world

Status = py_trees.common.Status
Blackboard = py_trees.blackboard.Blackboard
REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "livevlm-demo"
BAG_START = 1_700_000_000.0


# ---- helpers -----------------------------------------------------------------------------------------
def ticked(client, root, timeout=60.0, lines=None) -> py_trees.trees.BehaviourTree:
    """Set up `root` with the client's node, tick it at 10 Hz on that node's executor until it ends."""
    tree = py_trees.trees.BehaviourTree(root)
    tree.setup(node=client.node)
    time.sleep(1.0)             # a new action client: let discovery match its replies' reader (Client.wait_ready)
    if lines is not None:
        tree.add_post_tick_handler(StatusLines(write=lines.append))
    ticker = TreeTicker(tree, client.node, period_s=0.1)
    try:
        client.wait_for(ticker.finished.is_set, timeout, f"the tree {root.name!r} to end")
    finally:
        ticker.close()
    return tree


def seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def truth(episode, question: str, span_end) -> str:
    """The ground truth over the frames the node sampled (2 per second of bag time up to span_end),
    as the demo computes it."""
    t_end = seconds(span_end) - BAG_START
    return world.ground_truth([episode.state(k / 2.0) for k in range(int(t_end * 2.0) + 1)], question)


def right(question: str, answer: str, expected: str) -> bool:
    return world.answer_correct(world.QA("", question, expected), answer)


def where_the_toolbox_stood(episode, span_end) -> set[str]:
    """Every true answer to TOOLBOX_QUESTION over its last sighting in the sampled frames: the
    toolbox's room with each spot it stood at while continuously in view (it may move)."""
    t_end = seconds(span_end) - BAG_START
    states = [episode.state(k / 2.0) for k in range(int(t_end * 2.0) + 1)]
    name = TOOLBOX_QUESTION.rsplit("the ", 1)[1].rstrip("?")
    i, answers = world.last_seen(states, name)[0], set()
    while i >= 0 and (spot := dict((o, s) for s, o in states[i].spots).get(name)):
        answers.add(world.where_answer(name, states[i].room, spot))
        i -= 1
    return answers


def a_true_place(episode, answer: str, span_end) -> bool:
    """The demo model's answer to TOOLBOX_QUESTION is one of where_the_toolbox_stood. Only the last
    spot counts for QUALITY.md; here it cannot: on the demo bag the toolbox stood on the left for 4
    samples, then on the right for 2, and the demo model's logit for " right" beats " left" by only
    0.03-0.06 (benchmarks/answer_margins.py, QUALITY.md): CI's run of a7642d0 answered "left"."""
    return any(right(TOOLBOX_QUESTION, answer, place) for place in where_the_toolbox_stood(episode, span_end))


@pytest.fixture(autouse=True)
def _empty_blackboard():
    yield
    Blackboard.clear()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo node (demo config, shipped demo model) after the 60 s demo bag, replayed at 2x."""
    from livevlm_ros.tools.make_demo_bag import DEMO_SEED, write_bag

    tmp = tmp_path_factory.mktemp("bt_demo")
    episode = write_bag(tmp / "demo_bag", seconds=60.0, fps=10.0, seed=DEMO_SEED, start_time=BAG_START)
    params = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())["/**"]["ros__parameters"]
    # The ground truth below assumes every sampled frame was ingested: the frame queue holds all 120
    # samples of the bag (with the demo's 16, a 2-core machine busy with other work dropped some),
    # and no narration (it goes before frames in the worker's order; the trees do not read it).
    params.update(model_path=str(DEMO_MODEL), status_period_s=0.2, narration_period_s=0.0, frame_queue_size=128)
    node = NodeProcess(tmp, params)
    client = Client()
    try:
        client.wait_ready(node)
        play = subprocess.run([executable("livevlm_replay"), str(tmp / "demo_bag"), "--rate", "2"],
                              capture_output=True, text=True, timeout=150)
        assert play.returncode == 0, play.stderr
        s = client.settled(timeout=120)
        assert int(s["frames_ingested"]) == int(s["frames_sampled"]) > 0, \
            {k: v for k, v in s.items() if k.startswith("frames_")}
        yield SimpleNamespace(client=client, node=node, episode=episode)
    finally:
        client.close()
        node.stop()


@pytest.fixture
def tiny(start):  # noqa: F811 - the fixture from ros_harness
    """start_tiny(model, **params) -> a Client of a tiny-model node under /tiny, ready, no frame yet."""
    clients = []

    def _start(model, **params):
        node = start(node_params(model, camera_topics=["camera/image_raw"], **params), namespace="/tiny")
        clients.append(Client(namespace="/tiny"))
        clients[-1].wait_ready(node)
        return clients[-1]
    yield _start
    for c in clients:
        c.close()


def tiny_status(client, **want) -> dict:
    """The /tiny node's diagnostics once every key in `want` reads as given."""
    def matches():
        s = client.node_status("/tiny")
        return s if s and all(s.get(k) == str(v) for k, v in want.items()) else None
    return client.wait_for(matches, 10, f"diagnostics {want}")


# ---- the yes/no rule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, said", [
    ("Yes.", "yes"), ("yes", "yes"), ("YES, the door is open.", "yes"),
    ("No.", "no"), ("No, it is not open.", "no"),
    ("No idea.", "unsure"), ("Yes, I think so.", "unsure"), ("Maybe.", "unsure"), ("I'm not sure.", "unsure"),
    ("The door is open.", "unsure"), ("", "unsure"), ("Yesterday.", "unsure"), ("Yes or no.", "unsure"),
])
def test_a_yes_no_answer_is_read_by_its_first_word_and_a_hedge_makes_it_unsure(answer, said):
    assert verdict(answer) == said


def test_the_node_runs_without_py_trees():
    """py_trees is optional: the node's modules never import it (nor the leaves)."""
    import sys
    code = ("import sys; sys.modules['py_trees'] = None\n"          # `import py_trees` now raises ImportError
            "import livevlm_ros.ros.main, livevlm_ros.ros.lifecycle_node, livevlm_ros.tools.demo\n"
            "try:\n    import livevlm_ros.behaviours\nexcept ImportError:\n    print('leaves need py_trees')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "leaves need py_trees", out.stderr


# ---- the example tree on the demo model and the demo bag --------------------------------------------------
@pytest.mark.timeout(240)
def test_door_open_then_where_is_the_toolbox_then_go_there_gives_a_true_place_and_the_services_answer(demo):
    lines = []
    door = demo.client.query(DOOR_QUESTION, max_new_tokens=8)      # what the guard will be asked about
    door_open = truth(demo.episode, DOOR_QUESTION, door.span_end) == "Yes."
    tree = ticked(demo.client, find_the_toolbox(prefix="/t1", door_open=door_open), lines=lines)
    assert tree.root.status == Status.SUCCESS, lines

    door_result = Blackboard.get("/t1/door/result")
    assert right(DOOR_QUESTION, door_result.answer, truth(demo.episode, DOOR_QUESTION, door_result.span_end))
    assert Blackboard.get("/t1/door/verdict") == ("yes" if door_open else "no")

    result, answer = Blackboard.get("/t1/toolbox/result"), Blackboard.get("/t1/toolbox/answer")
    assert a_true_place(demo.episode, answer, result.span_end), \
        (answer, where_the_toolbox_stood(demo.episode, result.span_end))
    assert answer == result.answer and Blackboard.get("/t1/toolbox/error") == ""
    # the leaf gave what the query service gives for the same question on the same memory
    assert answer == demo.client.query(TOOLBOX_QUESTION, max_new_tokens=0).answer

    # "go there" read the answer and its evidence from the blackboard
    evidence = Blackboard.get("/t1/toolbox/evidence")
    target = Blackboard.get("/t1/go_there/target")
    assert evidence and target.answer == answer
    assert (target.stamp, target.camera) == (evidence[0].stamp, "/camera/image_raw")
    assert target.pose == evidence[0].pose and evidence[0].pose_known     # where the robot was (the bag's /odom)
    span = (seconds(result.span_start), seconds(result.span_end))
    assert all(span[0] <= seconds(e.stamp) <= span[1] and 0 < e.weight <= 1 for e in evidence)
    assert [e.weight for e in evidence] == sorted((e.weight for e in evidence), reverse=True)
    # one line per tick that changed a status, ending with the stand-in's success
    assert "go there (stand-in): SUCCESS" in lines[-1] and "find the red toolbox: SUCCESS" in lines[-1], lines


@pytest.mark.timeout(240)
def test_the_guard_branches_on_the_answer_and_the_next_leaf_never_asks(demo):
    door = demo.client.query(DOOR_QUESTION, max_new_tokens=8)
    door_open = truth(demo.episode, DOOR_QUESTION, door.span_end) == "Yes."
    root = find_the_toolbox(prefix="/t2", door_open=not door_open)   # the guard needs the other answer
    tree = ticked(demo.client, root)
    guard, where, go = root.children
    assert tree.root.status == Status.FAILURE and guard.status == Status.FAILURE
    assert Blackboard.get("/t2/door/verdict") == ("yes" if door_open else "no")
    assert "the guard needs" in Blackboard.get("/t2/door/error")
    assert where.status == Status.INVALID and go.status == Status.INVALID
    assert not Blackboard.exists("/t2/toolbox/result")                # never asked


@pytest.mark.timeout(300)
def test_twenty_trees_at_10hz_against_one_node_all_end_with_an_answer_or_a_refusal(demo):
    client = demo.client
    refused_before = int(client.node_status()["queries_refused"])
    trees = [py_trees.trees.BehaviourTree(find_the_toolbox(prefix=f"/tree{i}")) for i in range(20)]
    for tree in trees:
        tree.setup(node=client.node)
    time.sleep(1.0)
    tickers = [TreeTicker(tree, client.node, period_s=0.1) for tree in trees]
    try:
        client.wait_for(lambda: all(t.finished.is_set() for t in tickers), 180, "all 20 trees to end")
    finally:
        for t in tickers:
            t.close()
    answered, refusals = 0, 0
    alone = demo.client.query(TOOLBOX_QUESTION, max_new_tokens=0).answer      # one caller, same memory
    for i, tree in enumerate(trees):
        if tree.root.status == Status.SUCCESS:
            result = Blackboard.get(f"/tree{i}/toolbox/result")
            assert result.answer == alone, (i, result.answer, alone)          # 20 callers changed nothing
            assert a_true_place(demo.episode, result.answer, result.span_end)
            answered += 1
            continue
        failed = tree.root.current_child                       # the leaf the sequence failed at
        error = Blackboard.get(f"/tree{i}/{'door' if failed.name.startswith('door') else 'toolbox'}/error")
        assert error.startswith("goal rejected by /livevlm/ask") or error.startswith("busy:"), (i, failed.name, error)
        refusals += 1
    assert answered >= 1 and answered + refusals == 20
    # the node counted every refusal the trees heard (its queries_refused: rejected goals + "busy")
    client.wait_for(lambda: int(client.node_status()["queries_refused"]) == refused_before + refusals, 5,
                    f"the node to count {refusals} refusals")
    assert demo.node.alive()


# ---- halting, time-outs, fresh views: a tiny model under /tiny ----------------------------------------------
class PreemptAfterTokens(py_trees.behaviour.Behaviour):
    """The competing branch of a parallel: RUNNING until the answer on the blackboard has `tokens`
    tokens, then SUCCESS, upon which the parallel halts the Ask leaf."""

    def __init__(self, name, key, tokens):
        super().__init__(name)
        self.key, self.tokens = key, tokens
        self.seen = []                  # (tokens, partial answer) on the blackboard at each tick
        self.blackboard = self.attach_blackboard_client(name=name)
        for k in ("tokens", "partial_answer"):
            self.blackboard.register_key(key=f"{key}/{k}", access=py_trees.common.Access.READ)

    def update(self):
        self.seen.append((self.blackboard.get(f"{self.key}/tokens"), self.blackboard.get(f"{self.key}/partial_answer")))
        return Status.SUCCESS if self.seen[-1][0] >= self.tokens else Status.RUNNING


@pytest.mark.timeout(120)
def test_a_parallel_branch_that_preempts_ask_cancels_the_goal_and_the_engine_is_free_within_a_token(
        tiny, endless_model):
    client = tiny(endless_model, max_new_tokens=4000)
    client.feed(client.image(1.0), namespace="/tiny")
    ask = Ask("tell me everything", "Tell me everything.", key="/long", namespace="tiny", timeout_s=60)
    enough = PreemptAfterTokens("enough", "/long", tokens=5)
    root = py_trees.composites.Parallel("answer, unless preempted", policy=py_trees.common.ParallelPolicy.SuccessOnOne(),
                                        children=[ask, enough])
    ticked(client, root)
    assert root.status == Status.SUCCESS and ask.status == Status.INVALID        # halted, not ended
    tokens, partial = enough.seen[-1]                                              # it streamed meanwhile
    assert tokens >= 5 and enough.seen[0] == (0, "") and partial, enough.seen
    # the node: the goal cancelled, the answer stopped at most one token after the cancel came
    s = tiny_status(client, goals_cancelled=1, answers_cancelled=1, answering=False, queries_queued=0)
    assert int(s["tokens_after_last_cancel"]) <= 1 and s["queries_answered"] == "0"
    assert client.query("Is the door open?", max_new_tokens=2).success             # the engine is free


@pytest.mark.timeout(120)
def test_ask_times_out_with_the_reason_and_cancels_its_goal(tiny, endless_model):
    client = tiny(endless_model, max_new_tokens=4000)
    client.feed(client.image(1.0), namespace="/tiny")
    ask = Ask("slow answer", "Tell me everything.", key="/slow", namespace="tiny", timeout_s=1.0)
    ticked(client, ask)
    assert ask.status == Status.FAILURE and Blackboard.get("/slow/error").startswith("timed out after 1.0 s (")
    s = tiny_status(client, goals_cancelled=1, answers_cancelled=1, answering=False)
    assert int(s["tokens_after_last_cancel"]) <= 1


@pytest.mark.timeout(120)
def test_errors_fail_with_the_nodes_reason_and_an_unsure_answer_fails_the_guard(tiny, tiny_model_path):
    client = tiny(tiny_model_path)
    ask = Ask("too early", "Is the door open?", key="/early", namespace="tiny")
    ticked(client, ask)
    assert ask.status == Status.FAILURE and "no frame" in Blackboard.get("/early/error")
    client.feed(client.image(1.0), namespace="/tiny")
    # the tiny model is random: whatever it says is no plain yes or no, and the guard does not guess
    check = Check("door open?", "Is the door open?", key="/guard", namespace="tiny")
    ticked(client, check)
    answer = Blackboard.get("/guard/result").answer
    assert verdict(answer) == "unsure", answer                  # the premise of this test
    assert check.status == Status.FAILURE and Blackboard.get("/guard/verdict") == "unsure"
    assert Blackboard.get("/guard/error").startswith("unsure answer")
    # the question from a blackboard key: none there yet is a failure that says so, no goal sent
    unplanned = Ask("from the plan", question_key="/plan/question", key="/unplanned", namespace="tiny")
    ticked(client, unplanned)
    assert unplanned.status == Status.FAILURE
    assert Blackboard.get("/unplanned/error") == "no question at blackboard key /plan/question: None"
    Blackboard.set("/plan/question", "What is on the left?")
    ask = Ask("from the plan", question_key="/plan/question", key="/planned", namespace="tiny")
    ticked(client, ask)
    assert ask.status == Status.SUCCESS and Blackboard.get("/planned/answer") == Blackboard.get("/planned/result").answer


@pytest.mark.timeout(120)
def test_fresh_view_needs_a_frame_taken_after_the_decision_point(tiny, tiny_model_path):
    client = tiny(tiny_model_path, fresh_wait_s=0.5)
    client.feed(client.image(1.0), namespace="/tiny")            # an old frame (camera time 1 s)
    stale = FreshView("look now", "What is in the center?", key="/stale", namespace="tiny")
    ticked(client, stale)
    assert stale.status == Status.FAILURE and Blackboard.get("/stale/error").startswith("no fresh view"), \
        Blackboard.get("/stale/error")

    # a live camera, stamped by the same clock as the tree's node: the answer sees one of its frames
    def publish():
        client.image_pub.publish(client.raw_image(client.node.get_clock().now().nanoseconds))
    camera = client.node.create_timer(0.1, publish)
    try:
        fresh = FreshView("look now", "What is in the center?", key="/fresh", namespace="tiny")
        ticked(client, fresh)
    finally:
        client.node.destroy_timer(camera)
    result = Blackboard.get("/fresh/result")
    assert fresh.status == Status.SUCCESS, Blackboard.get("/fresh/error")
    assert seconds(result.span_end) >= seconds(fresh.not_before) > 1e9           # wall-clock decision point


@pytest.fixture(scope="module", autouse=True)
def _rclpy_shutdown_at_end():
    yield
    import rclpy
    rclpy.try_shutdown()
