# shellcheck shell=bash
# The real node of the testbed (testbed/README.md, "Real node"): a kubelet running real
# containers through containerd + runc, beside KWOK's simulated nodes. What kwokctl cannot
# do, so scripts/testbed sources this file; it uses the run directory, ports and PKI
# that scripts/testbed defines.

# Its names are fixed, so one per machine. Every address is from
# TEST-NET-2 (RFC 5737), which this machine's own network does not use (its eth0 is on
# TEST-NET-1 and the package proxy on TEST-NET-3): the host end of the veth pair is the
# API server's advertised address, pods get the upper half.
REAL_NODE_MODE=${DHARMA_TESTBED_REAL_NODE:-auto}
NODE_NAME=dharma-real-node
NODE_LABEL=dharma-stream.test/real-node
NODE_NETNS=dharma-node
NODE_VETH_HOST=dharma-veth0
NODE_VETH_NS=dharma-veth1
NODE_RANGE=198.51.100.0/24
NODE_HOST_IP=$ADVERTISE_ADDRESS
NODE_NS_IP=198.51.100.2
NODE_POD_CIDR=198.51.100.128/25
NODE_POD_GATEWAY=198.51.100.129
NODE_CNI_NETWORK=dharma-testbed
NODE_CNI_BIN_DIR=/usr/lib/cni
KUBERNETES_SERVICE_IP=10.96.0.1
KUBELET_PORT=$((PORT_BASE + 251))
KUBELET_HEALTHZ_PORT=$((PORT_BASE + 248))
IPT_COMMENT=dharma-testbed
PAUSE_IMAGE=dharma-testbed.local/pause:3.10
STRESS_IMAGE=dharma-testbed.local/stress:1
NODE_IMAGES_RECIPE=1
NODE_DIR=$RUN_DIR/node
NODE_SKIP_FILE=$RUN_DIR/node-skip
NODE_SOCKET=$NODE_DIR/containerd.sock
# Outlive `down`: imported images, and what the host looked like before the node.
NODE_CACHE=$CACHE_ROOT/node
NODE_CONTAINERD_ROOT=$NODE_CACHE/containerd-root
NODE_HOST_STATE=$NODE_CACHE/host-state

# The pid files of containerd and the kubelet (kwokctl keeps its components' own).
pid_file() { printf '%s/pids/%s.pid\n' "$RUN_DIR" "$1"; }

# Host sysctls the kubelet rewrites (setupKernelTunables); restored by node_down.
NODE_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

# node_images_dir: where the node's images are cached; keyed by their sources and gcc.
node_images_dir() {
  local digest
  digest=$(
    {
      printf 'recipe=%s gcc=%s\n' "$NODE_IMAGES_RECIPE" "$(gcc -dumpfullversion 2>/dev/null || echo none)"
      cat "$TESTBED_SRC/node/helper.c" "$TESTBED_SRC/node/mkimage.py"
    } | sha256sum | cut -c1-12
  )
  printf '%s/node-images-%s\n' "$CACHE_ROOT" "$digest"
}

# apt_install PACKAGE...: install Debian packages (root, or sudo without a password).
apt_install() {
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo -n)
  command -v apt-get >/dev/null || return 1
  log "installing Debian packages: $*"
  "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    --no-install-recommends "$@" >/dev/null
}

# The sandbox (pause) image and the test image: one static C program (helper.c),
# packed without docker (mkimage.py). Not fatal: without them the real node is skipped.
build_node_images() {
  [[ $REAL_NODE_MODE != 0 ]] || return 0
  local dir tmp
  dir=$(node_images_dir)
  [[ -f $dir/stress.tar && -f $dir/pause.tar ]] && return 0
  if ! command -v gcc >/dev/null || [[ ! -e /usr/include/stdio.h ]]; then
    apt_install gcc libc6-dev || { log "warning: no gcc/libc6-dev; the real node will be skipped"; return 0; }
  fi
  dir=$(node_images_dir) # gcc's version is part of the key
  [[ -f $dir/stress.tar && -f $dir/pause.tar ]] && return 0
  tmp=$dir.tmp.$$
  rm -rf "$tmp"
  mkdir -p "$tmp"
  log "node images (static helper, $PAUSE_IMAGE, $STRESS_IMAGE)"
  if ! gcc -Os -static -s -Wall -o "$tmp/helper" "$TESTBED_SRC/node/helper.c" 2>"$tmp/gcc.log"; then
    cat "$tmp/gcc.log" >&2
    log "warning: building testbed/node/helper.c failed; the real node will be skipped"
    rm -rf "$tmp"
    return 0
  fi
  local applet links=()
  for applet in pause sleep echo write cat exit alloc http; do links+=("bin/$applet->helper"); done
  python3 "$TESTBED_SRC/node/mkimage.py" "$tmp/pause.tar" "$PAUSE_IMAGE" '["/pause"]' "pause=$tmp/helper"
  python3 "$TESTBED_SRC/node/mkimage.py" "$tmp/stress.tar" "$STRESS_IMAGE" '["/bin/helper"]' \
    bin/ etc/ tmp/ "bin/helper=$tmp/helper" "${links[@]}" "pause->bin/helper"
  rm -f "$tmp/gcc.log"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  # Older versions (a few MiB each): what they held is in containerd's root if needed.
  local old
  for old in "$CACHE_ROOT"/node-images-*; do
    [[ $old == "$dir" || $old == *.tmp.* ]] || rm -rf "$old"
  done
}

node_ctr() { ctr --address "$NODE_SOCKET" --namespace k8s.io "$@"; }
node_ns() { nsenter --net="/run/netns/$NODE_NETNS" -- "$@"; }

# node_pid <kubelet|containerd>: its pid if alive and the expected program.
node_pid() {
  local name=$1 file pid exe want
  file=$(pid_file "$name")
  [[ -f $file ]] || return 1
  pid=$(cat "$file")
  [[ -n $pid && -d /proc/$pid ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  case $name in
    kubelet) want=$(readlink -f "$(cat "$RUN_DIR/bin-dir")/kubelet") ;;
    containerd) want=$(readlink -f "$(command -v containerd)") ;;
  esac
  [[ $exe == "$want" ]] || return 1
  printf '%s\n' "$pid"
}

# node_skip <reason>: the real node does not run; tear down what was set up and
# remember why (`node-info`). With DHARMA_TESTBED_REAL_NODE=1 that fails `up`.
node_skip() {
  local reason=$1
  if [[ -d $NODE_DIR || -d $NODE_HOST_STATE ]]; then node_down; fi
  mkdir -p "$RUN_DIR"
  printf '%s\n' "$reason" >"$NODE_SKIP_FILE"
  if [[ $REAL_NODE_MODE == 1 ]]; then die "real node: $reason (DHARMA_TESTBED_REAL_NODE=1)"; fi
  log "real node skipped: $reason"
}

node_skipped() { [[ -f $NODE_SKIP_FILE ]]; }

# Why the real node cannot run here (prints nothing if it can). Installs missing packages.
node_preflight() {
  if [[ $REAL_NODE_MODE == 0 ]]; then echo "disabled by DHARMA_TESTBED_REAL_NODE=0"; return; fi
  [[ $(id -u) -eq 0 ]] || { echo "needs root (a kubelet, containerd, a network namespace, iptables)"; return; }
  local capeff cap
  capeff=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
  for cap in 12:CAP_NET_ADMIN 21:CAP_SYS_ADMIN; do
    (((16#$capeff >> ${cap%%:*}) & 1)) || { echo "missing capability ${cap#*:} (CapEff $capeff)"; return; }
  done
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    grep -qw memory /sys/fs/cgroup/cgroup.controllers ||
      { echo "no cgroup memory controller (cgroup v2 without memory in /sys/fs/cgroup/cgroup.controllers)"; return; }
  elif [[ ! -f /sys/fs/cgroup/memory/memory.limit_in_bytes ]]; then
    echo "no cgroup memory controller (neither cgroup v2 nor /sys/fs/cgroup/memory of cgroup v1)"; return
  fi
  [[ -x $(cat "$RUN_DIR/bin-dir")/kubelet ]] || { echo "no kubelet binary (scripts/testbed build)"; return; }
  local images
  images=$(node_images_dir)
  [[ -f $images/pause.tar && -f $images/stress.tar ]] ||
    { echo "no node images in $images (building testbed/node/helper.c needs gcc and libc6-dev)"; return; }
  local pkgs=() p
  command -v containerd >/dev/null && command -v ctr >/dev/null || pkgs+=(containerd)
  command -v runc >/dev/null || pkgs+=(runc)
  [[ -x $NODE_CNI_BIN_DIR/bridge && -x $NODE_CNI_BIN_DIR/host-local ]] || pkgs+=(containernetworking-plugins)
  command -v iptables >/dev/null || pkgs+=(iptables)
  command -v ip >/dev/null || pkgs+=(iproute2)
  command -v nsenter >/dev/null || pkgs+=(util-linux)
  if ((${#pkgs[@]})) && ! apt_install "${pkgs[@]}" >&2; then
    echo "missing Debian packages ${pkgs[*]} and apt-get install failed"; return
  fi
  for p in containerd ctr runc iptables ip nsenter; do
    command -v "$p" >/dev/null || { echo "no $p after installing its package"; return; }
  done
  [[ -x $NODE_CNI_BIN_DIR/bridge ]] || { echo "no CNI plugins in $NODE_CNI_BIN_DIR"; return; }
  iptables -t nat -S >/dev/null 2>&1 || { echo "iptables nat table not usable: $(iptables -t nat -S 2>&1 | head -n1)"; return; }
  for p in "$KUBELET_PORT" "$KUBELET_HEALTHZ_PORT"; do
    ! port_in_use "$p" || { echo "port 127.0.0.1:$p is in use"; return; }
  done
  if [[ -e /run/netns/$NODE_NETNS ]] || ip link show "$NODE_VETH_HOST" >/dev/null 2>&1; then
    echo "network namespace $NODE_NETNS or link $NODE_VETH_HOST exists and is not this testbed's (another testbed on this machine?)"; return
  fi
  # The addresses must be free here: the host's own network may use TEST-NET ranges too
  # (a route to the pods must not capture, say, the package proxy's address).
  local taken
  taken=$(ip -4 -o addr show to "$NODE_RANGE"; ip -4 route show root "$NODE_RANGE")
  [[ -z $taken ]] || { echo "$NODE_RANGE is already used on this host: $(tr '\n' ' ' <<<"$taken")"; return; }
  local ns
  while read -r ns; do
    [[ ${ns%.*} != "${NODE_RANGE%.*}" ]] || { echo "the host's DNS server $ns is in $NODE_RANGE"; return; }
  done < <(sed -n 's/^nameserver[[:space:]]*\([0-9.]*\).*/\1/p' /etc/resolv.conf 2>/dev/null)
}

# The snapshotter: overlayfs where an overlay mount works on the containerd root's
# file system, else native (slower, a full copy per container).
node_snapshotter() {
  local d=$NODE_CACHE/overlay-check
  rm -rf "$d"
  mkdir -p "$d"/{lower,upper,work,merged}
  if mount -t overlay overlay -o "lowerdir=$d/lower,upperdir=$d/upper,workdir=$d/work" "$d/merged" 2>/dev/null; then
    umount "$d/merged"
    rm -rf "$d"
    echo overlayfs
  else
    rm -rf "$d"
    echo native
  fi
}

# render <template> <out> KEY=VALUE...: replace each @KEY@.
render() {
  local template=$1 out=$2 kv expr=()
  shift 2
  for kv in "$@"; do expr+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
  sed "${expr[@]}" "$template" >"$out"
}

# What the host looked like before the node, to put it back (survives RUN_DIR).
record_host_state() {
  local s=$NODE_HOST_STATE
  mkdir -p "$s"
  if [[ ! -f $s/sysctl ]]; then
    local k v
    for k in "${NODE_SYSCTLS[@]}"; do
      if v=$(sysctl -n "$k" 2>/dev/null); then printf '%s=%s\n' "$k" "$v"; fi
    done >"$s/sysctl.tmp"
    mv "$s/sysctl.tmp" "$s/sysctl"
  fi
  local path
  for path in /run/netns /var/log/containers /var/lib/cni /var/lib/kubelet /run/containerd \
    /sys/fs/cgroup/memory/kubepods /sys/fs/cgroup/kubepods; do
    [[ -e $path || -e $s/created${path//\//_} ]] || : >"$s/created${path//\//_}"
  done
}

# veth pair host <-> namespace, routes, NAT: pods reach host loopback services at
# NODE_HOST_IP:<port> and the API server at the `kubernetes` Service; nothing else.
# The namespace has no default route, and the host never forwards what comes from it
# (FORWARD drop), so no packet of a pod can leave the machine. The route to the Service
# IP serves node-exec (a process of the namespace itself: nat OUTPUT is after routing);
# pods' packets are rewritten in PREROUTING, before routing.
node_network_up() {
  local c=(-m comment --comment "$IPT_COMMENT")
  ip netns add "$NODE_NETNS" &&
    ip link add "$NODE_VETH_HOST" type veth peer name "$NODE_VETH_NS" netns "$NODE_NETNS" &&
    ip addr add "$NODE_HOST_IP/30" dev "$NODE_VETH_HOST" &&
    ip link set "$NODE_VETH_HOST" up &&
    node_ns ip link set lo up &&
    node_ns ip addr add "$NODE_NS_IP/30" dev "$NODE_VETH_NS" &&
    node_ns ip link set "$NODE_VETH_NS" up &&
    node_ns sysctl -qw net.ipv4.ip_forward=1 &&
    ip route add "$NODE_POD_CIDR" via "$NODE_NS_IP" dev "$NODE_VETH_HOST" &&
    sysctl -qw "net.ipv4.conf.$NODE_VETH_HOST.route_localnet=1" &&
    iptables -t filter -I FORWARD -i "$NODE_VETH_HOST" "${c[@]}" -j DROP &&
    iptables -t nat -A PREROUTING -i "$NODE_VETH_HOST" -d "$NODE_HOST_IP/32" -p tcp "${c[@]}" \
      -j DNAT --to-destination 127.0.0.1 &&
    iptables -t nat -A INPUT -i "$NODE_VETH_HOST" -d 127.0.0.1/32 -p tcp "${c[@]}" \
      -j SNAT --to-source 127.0.0.1 &&
    node_ns iptables -t nat -A PREROUTING -d "$KUBERNETES_SERVICE_IP/32" -p tcp --dport 443 "${c[@]}" \
      -j DNAT --to-destination "$NODE_HOST_IP:$APISERVER_PORT" &&
    node_ns iptables -t nat -A OUTPUT -d "$KUBERNETES_SERVICE_IP/32" -p tcp --dport 443 "${c[@]}" \
      -j DNAT --to-destination "$NODE_HOST_IP:$APISERVER_PORT" &&
    node_ns ip route add "$KUBERNETES_SERVICE_IP/32" via "$NODE_HOST_IP" dev "$NODE_VETH_NS"
}

node_network_down() {
  if [[ -e /run/netns/$NODE_NETNS ]]; then ip netns del "$NODE_NETNS" 2>/dev/null || true; fi
  ip link del "$NODE_VETH_HOST" 2>/dev/null || true # also its routes and route_localnet
  local table rule
  for table in nat filter; do
    { iptables -t "$table" -S 2>/dev/null || true; } | { grep -F -- "--comment $IPT_COMMENT" || true; } |
      sed 's/^-A /-D /' | while read -r rule; do
        # shellcheck disable=SC2086 # the rule is iptables-save words without quoting needs
        iptables -t "$table" $rule 2>/dev/null || true
      done
  done
}

# node_start: everything up to a running containerd; the kubelet follows once the
# API server is up (node_start_kubelet), then node_wait_ready.
node_start() {
  rm -f "$NODE_SKIP_FILE"
  local reason
  reason=$(node_preflight)
  if [[ -n $reason ]]; then node_skip "$reason"; return 0; fi
  record_host_state
  local snapshotter
  mkdir -p "$NODE_DIR"/{cni-conf,cni-ipam,runc,kubelet,pod-logs,volume-plugins} "$NODE_CONTAINERD_ROOT"
  if ! node_network_up 2>"$NODE_DIR/network.err"; then
    node_skip "network setup failed: $(tr '\n' ' ' <"$NODE_DIR/network.err")"
    return 0
  fi
  snapshotter=$(node_snapshotter)
  printf '%s\n' "$snapshotter" >"$NODE_DIR/snapshotter"
  render "$TESTBED_SRC/node/containerd.toml" "$NODE_DIR/containerd.toml" \
    ROOT="$NODE_CONTAINERD_ROOT" STATE="$NODE_DIR/containerd-state" SOCKET="$NODE_SOCKET" \
    SANDBOX_IMAGE="$PAUSE_IMAGE" STREAM_ADDRESS="$NODE_NS_IP" SNAPSHOTTER="$snapshotter" \
    RUNC="$(command -v runc)" RUNC_ROOT="$NODE_DIR/runc" \
    CNI_BIN_DIR="$NODE_CNI_BIN_DIR" CNI_CONF_DIR="$NODE_DIR/cni-conf"
  render "$TESTBED_SRC/node/cni.conflist" "$NODE_DIR/cni-conf/10-dharma.conflist" \
    IPAM_DIR="$NODE_DIR/cni-ipam" POD_CIDR="$NODE_POD_CIDR" POD_GATEWAY="$NODE_POD_GATEWAY"
  render "$TESTBED_SRC/node/kubelet.yaml" "$NODE_DIR/kubelet.yaml" \
    CONTAINERD_SOCKET="$NODE_SOCKET" NODE_IP="$NODE_HOST_IP" PORT="$KUBELET_PORT" \
    HEALTHZ_PORT="$KUBELET_HEALTHZ_PORT" PKI="$PKI_DIR" POD_LOGS_DIR="$NODE_DIR/pod-logs" \
    VOLUME_PLUGIN_DIR="$NODE_DIR/volume-plugins"
  # setsid + nsenter (which execs containerd: the pid is containerd's); not `ip netns
  # exec`, which remounts /sys and so hides the cgroup mounts from containerd.
  setsid nsenter --net="/run/netns/$NODE_NETNS" -- "$(command -v containerd)" \
    --config "$NODE_DIR/containerd.toml" </dev/null >>"$RUN_DIR/logs/containerd.log" 2>&1 8>&- 9>&- &
  printf '%s\n' "$!" >"$(pid_file containerd)"
}

node_running() { [[ -d $NODE_DIR && ! -f $NODE_SKIP_FILE ]]; }

# The images the node needs, imported unless containerd already has them
# (its root outlives `down`).
node_import_images() {
  local dir f
  dir=$(node_images_dir)
  for f in pause stress; do node_import "$dir/$f.tar" >/dev/null || return 1; done
}

node_start_kubelet() {
  node_running || return 0
  local i
  for ((i = 0; i < 120; i++)); do
    if node_ctr version >/dev/null 2>&1; then break; fi
    if ! node_pid containerd >/dev/null; then
      node_skip "containerd exited: $(tail -n 3 "$RUN_DIR/logs/containerd.log" | tr '\n' ' ')"
      return 0
    fi
    sleep 0.25
  done
  if ((i == 120)); then node_skip "containerd did not answer within 30s (log: $RUN_DIR/logs/containerd.log)"; return 0; fi
  if ! node_import_images 2>"$NODE_DIR/import.err"; then
    node_skip "importing the node images failed: $(tr '\n' ' ' <"$NODE_DIR/import.err")"
    return 0
  fi
  # The node's identity (Node authorizer: system:node:<name>) and its serving
  # certificate, from the cluster's CA, which exists once kwokctl has made the cluster.
  issue_cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  issue_cert kubelet-serving "/CN=$NODE_NAME" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$NODE_HOST_IP,DNS:$NODE_NAME"
  write_kubeconfig "$RUN_DIR/kubelet.kubeconfig" kubelet
  setsid "$(cat "$RUN_DIR/bin-dir")/kubelet" \
    --config="$NODE_DIR/kubelet.yaml" \
    --kubeconfig="$RUN_DIR/kubelet.kubeconfig" \
    --root-dir="$NODE_DIR/kubelet" \
    --cert-dir="$NODE_DIR/kubelet/pki" \
    --hostname-override="$NODE_NAME" \
    --node-ip="$NODE_HOST_IP" \
    --node-labels="$NODE_LABEL=true" \
    --v=1 </dev/null >>"$RUN_DIR/logs/kubelet.log" 2>&1 8>&- 9>&- &
  printf '%s\n' "$!" >"$(pid_file kubelet)"
  date +%s.%N >"$NODE_DIR/kubelet-started"
}

node_ready() {
  [[ $(kctl get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

# Ready as reported by this kubelet: a heartbeat since it started (a restarted node's
# object still says Ready for a while).
node_ready_since_start() {
  local beat started
  beat=$(kctl get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}' 2>/dev/null) ||
    return 1
  [[ $beat == "True "* ]] || return 1
  started=$(cut -d. -f1 "$NODE_DIR/kubelet-started")
  (($(date -d "${beat#True }" +%s) >= started))
}

node_healthy() {
  node_running && node_pid containerd >/dev/null && node_pid kubelet >/dev/null &&
    curl --silent --fail --max-time 5 --output /dev/null "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz" &&
    node_ready
}

node_wait_ready() {
  node_running || return 0
  local i
  for ((i = 0; i < 360; i++)); do
    if node_ready_since_start; then
      log "real node $NODE_NAME Ready ($(awk -v s="$(cat "$NODE_DIR/kubelet-started")" -v n="$(date +%s.%N)" \
        'BEGIN { printf "%.1f", n - s }')s after the kubelet started)"
      return 0
    fi
    if ! node_pid kubelet >/dev/null; then
      node_skip "kubelet exited: $(grep -E '^[EF][0-9]{4}' "$RUN_DIR/logs/kubelet.log" | tail -n 2 | tr '\n' ' ') (log: $RUN_DIR/logs/kubelet.log)"
      return 0
    fi
    if ! node_pid containerd >/dev/null; then
      node_skip "containerd exited: $(tail -n 3 "$RUN_DIR/logs/containerd.log" | tr '\n' ' ')"
      return 0
    fi
    sleep 0.25
  done
  node_skip "node $NODE_NAME not Ready after 90s: $(grep -E '^E[0-9]{4}' "$RUN_DIR/logs/kubelet.log" | tail -n 2 | tr '\n' ' ') (log: $RUN_DIR/logs/kubelet.log)"
}

# stop_pid <name> <pid> <seconds>: SIGTERM, then SIGKILL after the grace period.
stop_pid() {
  local name=$1 pid=$2 grace=$3 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < grace * 10; i++)); do
    [[ -d /proc/$pid ]] || return 0
    sleep 0.1
  done
  log "$name (pid $pid) ignored SIGTERM; killing"
  kill -KILL "$pid" 2>/dev/null || true
  while [[ -d /proc/$pid ]]; do sleep 0.1; done
}

# mounts_under DIR...: mount points at or below the directories, deepest first.
mounts_under() {
  local m d
  findmnt -rn -o TARGET | while read -r m; do
    for d in "$@"; do
      if [[ $m == "$d" || $m == "$d"/* ]]; then printf '%s\n' "$m"; fi
    done
  done | sort -r
}

# Processes of the node that outlive containerd: its shims and the containers.
node_leftover_pids() {
  local p cmd
  for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
    [[ $cmd == *containerd-shim* && $cmd == *"-address $NODE_SOCKET "* ]] && printf '%s\n' "${p#/proc/}"
  done
  if [[ -f $NODE_HOST_STATE/created_sys_fs_cgroup_memory_kubepods && -d /sys/fs/cgroup/memory/kubepods ]]; then
    find /sys/fs/cgroup/memory/kubepods -name cgroup.procs -exec cat {} + 2>/dev/null
  fi
  if [[ -f $NODE_HOST_STATE/created_sys_fs_cgroup_kubepods && -d /sys/fs/cgroup/kubepods ]]; then
    find /sys/fs/cgroup/kubepods -name cgroup.procs -exec cat {} + 2>/dev/null
  fi
}

# Stop the real node and put the host back as record_host_state found it. Idempotent;
# every step runs whatever failed before it.
node_down() {
  local pid
  if pid=$(node_pid kubelet); then stop_pid kubelet "$pid" 10; fi
  rm -f "$(pid_file kubelet)"
  local ids=() id ctr=(ctr --address "$NODE_SOCKET" --namespace k8s.io)
  if pid=$(node_pid containerd); then
    # Containers and sandboxes go through containerd, so the shims exit and unmount.
    mapfile -t ids < <(timeout 10 "${ctr[@]}" containers ls -q 2>/dev/null)
    for id in $(timeout 10 "${ctr[@]}" tasks ls -q 2>/dev/null); do
      timeout 10 "${ctr[@]}" tasks kill --all --signal SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for id in $(timeout 10 "${ctr[@]}" tasks ls -q 2>/dev/null); do
      timeout 20 "${ctr[@]}" tasks delete --force "$id" >/dev/null 2>&1 || true
    done
    for id in "${ids[@]}"; do
      timeout 10 "${ctr[@]}" containers delete "$id" >/dev/null 2>&1 || true
    done
    stop_pid containerd "$pid" 10
  fi
  rm -f "$(pid_file containerd)"
  local left i
  for ((i = 0; i < 50; i++)); do
    left=$(node_leftover_pids | sort -u)
    [[ -n $left ]] || break
    # shellcheck disable=SC2086 # a list of pids
    kill -KILL $left 2>/dev/null || true
    sleep 0.1
  done
  # A shim killed rather than shut down leaves its socket, named by a hash of
  # containerd's address, the namespace and the sandbox's id (containerd 1.6).
  for id in "${ids[@]}"; do
    rm -f "/run/containerd/s/$(printf '%s/k8s.io/%s' "$NODE_SOCKET" "$id" | sha256sum | cut -c1-64)"
  done
  # Mounts: the kubelet's volumes and its rshared root, containerd's rootfs, shm, netns.
  local m
  mounts_under "$NODE_DIR" "$NODE_CONTAINERD_ROOT" |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  # Containers' remains in the persistent root (images stay).
  if [[ -z $(mounts_under "$NODE_CONTAINERD_ROOT") ]]; then
    rm -rf "$NODE_CONTAINERD_ROOT/io.containerd.grpc.v1.cri/containers" \
      "$NODE_CONTAINERD_ROOT/io.containerd.grpc.v1.cri/sandboxes"
  fi
  local s=$NODE_HOST_STATE
  if [[ -d $s ]]; then
    node_network_down # only what this testbed made: another testbed may own the names
    local kv
    if [[ -f $s/sysctl ]]; then
      while IFS= read -r kv; do sysctl -qw "$kv" >/dev/null 2>&1 || log "warning: could not restore $kv"; done <"$s/sysctl"
    fi
    # What the kubelet, CNI and the shims leave on the host, if they created it.
    if [[ -f $s/created_var_log_containers && -d /var/log/containers ]]; then
      find /var/log/containers -maxdepth 1 -type l -lname "$NODE_DIR/*" -delete 2>/dev/null || true
      rmdir /var/log/containers 2>/dev/null || true
    fi
    # libcni's result cache: ours and containerd's loopback entry of each sandbox.
    local f id
    for f in /var/lib/cni/results/"$NODE_CNI_NETWORK"-*; do
      [[ -e $f ]] || continue
      id=${f#/var/lib/cni/results/"$NODE_CNI_NETWORK"-}
      rm -f "$f" /var/lib/cni/results/cni-loopback-"${id%-*}"-lo
    done
    if [[ -f $s/created_var_lib_cni ]]; then rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null || true; fi
    # The device plugin manager's socket and checkpoint (a fixed path in the kubelet).
    if [[ -f $s/created_var_lib_kubelet && -d /var/lib/kubelet ]]; then
      rm -f /var/lib/kubelet/device-plugins/kubelet.sock /var/lib/kubelet/device-plugins/kubelet_internal_checkpoint
      rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet 2>/dev/null || true
    fi
    if [[ -f $s/created_run_containerd ]]; then rmdir /run/containerd/s /run/containerd 2>/dev/null || true; fi
    # `ip netns add` made /run/netns a mount point of itself (shared propagation).
    if [[ -f $s/created_run_netns && -d /run/netns && -z $(ls -A /run/netns) ]]; then
      umount /run/netns 2>/dev/null || true
      rmdir /run/netns 2>/dev/null || true
    fi
    local cg
    for cg in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
      [[ -d $cg ]] || continue
      if [[ $cg == /sys/fs/cgroup/kubepods && -f $s/created_sys_fs_cgroup_kubepods ]] ||
        [[ $cg != /sys/fs/cgroup/kubepods && -f $s/created_sys_fs_cgroup_memory_kubepods ]]; then
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
      fi
    done
    rm -rf "$s"
  fi
  if [[ -z $(mounts_under "$NODE_DIR") ]]; then rm -rf "$NODE_DIR"; fi
  rm -f "$RUN_DIR/kubelet.kubeconfig"
}

# Is there anything of the real node to tear down?
node_present() {
  [[ -d $NODE_DIR || -d $NODE_HOST_STATE ]]
}

# node_import FILE: import a docker-archive/OCI tarball into the node's containerd
# (k8s.io namespace, unpacked); prints the image names. A tarball imported before
# (same bytes, same snapshotter) whose images are all still there is not imported again.
node_import() {
  local file=$1 digest snapshotter marker names name missing=0
  snapshotter=$(cat "$NODE_DIR/snapshotter")
  digest=$(sha256sum "$file" | cut -c1-64)
  marker=$NODE_CACHE/imported/$snapshotter-$digest
  if [[ -s $marker ]]; then
    names=$(node_ctr images ls -q)
    while read -r name; do grep -qxF "$name" <<<"$names" || missing=1; done <"$marker"
    if ((missing == 0)); then
      cat "$marker"
      return 0
    fi
  fi
  mkdir -p "$NODE_CACHE/imported"
  node_ctr images import --snapshotter "$snapshotter" "$file" >"$marker.out" || return 1
  sed -n 's/^unpacking \(.*\) (sha256:.*$/\1/p' "$marker.out" >"$marker.tmp"
  rm -f "$marker.out"
  [[ -s $marker.tmp ]] || { rm -f "$marker.tmp"; echo "no image found in $file" >&2; return 1; }
  mv "$marker.tmp" "$marker"
  cat "$marker"
}

json_string() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }

cmd_node_info() {
  local reason=
  if [[ ! -f $RUN_DIR/key ]]; then
    reason="the testbed is not up (scripts/testbed up)"
  elif node_skipped; then
    reason=$(cat "$NODE_SKIP_FILE")
  elif ! node_running; then
    reason="the real node was not started by this testbed's \`up\`"
  elif ! node_healthy; then
    reason="the real node is not healthy (kubelet, containerd or node Ready); see scripts/testbed status and $RUN_DIR/logs/kubelet.log"
  fi
  if [[ -n $reason ]]; then
    printf '{"skip": %s}\n' "$(json_string "$reason")"
    return 0
  fi
  printf '{"name": "%s", "hostAddress": "%s", "podCIDR": "%s", "containerdAddress": "%s", "label": "%s", "taint": "%s", "stressImage": "%s", "sandboxImage": "%s", "netns": "%s"}\n' \
    "$NODE_NAME" "$NODE_HOST_IP" "$NODE_POD_CIDR" "$NODE_SOCKET" "$NODE_LABEL=true" "$NODE_LABEL" \
    "$STRESS_IMAGE" "$PAUSE_IMAGE" "$NODE_NETNS"
}

cmd_node_import() {
  local file=${1:-}
  [[ -n $file ]] || die "usage: scripts/testbed node-import FILE|-"
  if ! node_running || ! node_pid containerd >/dev/null; then
    die "the real node is not running: $(cat "$NODE_SKIP_FILE" 2>/dev/null || echo 'testbed not up')"
  fi
  if [[ $file == - ]]; then
    local tmp
    tmp=$(mktemp "$NODE_DIR/import.XXXXXX")
    # shellcheck disable=SC2064 # expand now: the file is this call's
    trap "rm -f '$tmp'" EXIT
    cat >"$tmp"
    file=$tmp
  fi
  [[ -f $file ]] || die "no such file: $file"
  node_import "$file"
}

cmd_node_exec() {
  (($#)) || die "usage: scripts/testbed node-exec CMD..."
  [[ -e /run/netns/$NODE_NETNS ]] || die "the real node's network namespace $NODE_NETNS does not exist"
  exec nsenter --net="/run/netns/$NODE_NETNS" -- "$@"
}

