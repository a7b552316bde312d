// AskLiveVLM: a BehaviorTree.CPP leaf on BehaviorTree.ROS2's RosActionNode that asks livevlm_ros
// through its ~/ask action (livevlm_ros/action/Ask), for C++ trees such as Nav2's.
//
// NOT compiled here: the repository's set-up installs ROS 2 from PyPI wheels, which have no rclcpp,
// rclcpp_action or BehaviorTree.CPP. It follows BehaviorTree.ROS2's RosActionNode interface
// (behaviortree_ros2/bt_action_node.hpp: setGoal, onResultReceived, onFeedback, onFailure, with the
// port `action_name`); check it against the BehaviorTree.ROS2 release you build with. The tested
// leaves are the py_trees ones in livevlm_ros/behaviours/.
//
// RosActionNode never blocks a tick and cancels the goal when the node is halted; the node then stops
// the answer at its next token. Ports: question, last_seconds, expect ("" | "yes" | "no"); outputs
// partial_answer (while RUNNING), answer, evidence_stamp / evidence_camera / evidence_pose (strongest evidence frame),
// error. With `expect` set the leaf is a guard: the answer's first word must be it, and a hedge
// ("No idea", "Yes, I think so") is unsure and fails, as in livevlm_ros/behaviours/yes_no.py.

#include <algorithm>
#include <cctype>
#include <set>
#include <sstream>
#include <string>

#include <behaviortree_ros2/bt_action_node.hpp>
#include <behaviortree_ros2/plugins.hpp>
#include <builtin_interfaces/msg/time.hpp>
#include <geometry_msgs/msg/pose_stamped.hpp>

#include "livevlm_ros/action/ask.hpp"

using Ask = livevlm_ros::action::Ask;

namespace
{
// "yes", "no" or "unsure": the rule of livevlm_ros/behaviours/yes_no.py.
std::string verdict(const std::string & answer)
{
  static const std::set<std::string> hedges{"maybe", "perhaps", "possibly", "probably", "unsure", "sure",
    "idea", "know", "unclear", "uncertain", "think", "guess", "might", "cannot", "can't", "or"};
  std::string text;
  for (char c : answer) {
    text += std::isalpha(static_cast<unsigned char>(c)) || c == '\'' ? static_cast<char>(std::tolower(c)) : ' ';
  }
  std::istringstream words(text);
  std::string first, word;
  if (!(words >> first) || (first != "yes" && first != "no")) {return "unsure";}
  while (words >> word) {
    if (hedges.count(word)) {return "unsure";}
  }
  return first;
}
}  // namespace

class AskLiveVLM : public BT::RosActionNode<Ask>
{
public:
  AskLiveVLM(const std::string & name, const BT::NodeConfig & conf, const BT::RosNodeParams & params)
  : BT::RosActionNode<Ask>(name, conf, params) {}

  static BT::PortsList providedPorts()
  {
    return providedBasicPorts({
      BT::InputPort<std::string>("question"),
      BT::InputPort<double>("last_seconds", 0.0, "> 0: only the last N seconds before the newest frame"),
      BT::InputPort<std::string>("expect", "", "yes | no: a guard that succeeds on this answer"),
      BT::OutputPort<std::string>("partial_answer"),
      BT::OutputPort<std::string>("answer"),
      BT::OutputPort<builtin_interfaces::msg::Time>("evidence_stamp"),
      BT::OutputPort<std::string>("evidence_camera"),
      BT::OutputPort<geometry_msgs::msg::PoseStamped>("evidence_pose"),   // where the robot was (if known)
      BT::OutputPort<std::string>("error")});
  }

  bool setGoal(Goal & goal) override
  {
    auto question = getInput<std::string>("question");
    if (!question || question->empty()) {return false;}   // INVALID_GOAL -> onFailure
    goal.question = *question;
    goal.last_seconds = getInput<double>("last_seconds").value_or(0.0);
    return true;
  }

  BT::NodeStatus onFeedback(const std::shared_ptr<const Feedback> feedback) override
  {
    setOutput("partial_answer", feedback->partial_answer);
    return BT::NodeStatus::RUNNING;
  }

  BT::NodeStatus onResultReceived(const WrappedResult & wr) override
  {
    const auto & r = *wr.result;
    if (!r.success) {return fail(r.error_message);}       // "busy ...", "no frame ...", "cancelled"
    setOutput("answer", r.answer);
    if (!r.evidence.empty()) {                            // strongest first
      setOutput("evidence_stamp", r.evidence[0].stamp);
      setOutput("evidence_camera", r.evidence[0].camera);
      if (r.evidence[0].pose_known) {setOutput("evidence_pose", r.evidence[0].pose);}
    }
    const std::string expect = getInput<std::string>("expect").value_or("");
    if (expect.empty()) {return BT::NodeStatus::SUCCESS;}
    const std::string said = verdict(r.answer);
    if (said == expect) {return BT::NodeStatus::SUCCESS;}
    return fail(said == "unsure" ? "unsure answer: " + r.answer : "answered: " + r.answer);
  }

  BT::NodeStatus onFailure(BT::ActionNodeErrorCode error) override
  {
    // GOAL_REJECTED_BY_SERVER: the node is busy (max_pending_queries) or the question too long
    return fail(std::string("Ask action failed: ") + BT::toStr(error));
  }

private:
  BT::NodeStatus fail(const std::string & why)
  {
    setOutput("error", why);
    return BT::NodeStatus::FAILURE;
  }
};

// A plugin for a BehaviorTree.ROS2 tree executor; or register it directly:
//   factory.registerNodeType<AskLiveVLM>("AskLiveVLM", BT::RosNodeParams(node, "/livevlm/ask"));
CreateRosNodePlugin(AskLiveVLM, "AskLiveVLM");
