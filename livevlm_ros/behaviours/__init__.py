"""py_trees leaves that ask the node (livevlm_ros/action/Ask) from a behaviour tree.

    Ask         a question; RUNNING while the answer streams, SUCCESS with answer and evidence
    Check       a yes/no guard (yes_no.verdict: unsure fails)
    FreshView   a question the answer to which must see a frame taken after the decision point

py_trees is an optional dependency of livevlm_ros: only this subpackage imports it, the node never
does. Each leaf takes the tree's rclpy node in setup(node=...) and never blocks a tick; see ask.py
for who spins what, ticking.py for a ticker, example_tree.py for the README's tree.
"""

from .ask import Ask
from .check import Check
from .fresh_view import FreshView
from .ticking import StatusLines, TreeTicker
from .yes_no import verdict

__all__ = ["Ask", "Check", "FreshView", "StatusLines", "TreeTicker", "verdict"]
