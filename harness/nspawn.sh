# Booted Debian containers, sourced by tests/system/e2e-nspawn and
# install-order and by script/demo. See ../shared/NSPAWN.md for why each step is done the way
# it is (roots cached as tarballs, dependencies downloaded in a chroot because
# the booted container has a private network, nsenter + setsid to run inside).
#
# The caller sets $repo and $work; each container is one directory, one
# nspawn process and one PID 1:
#   root_from_cache RELEASE DIR      unpack (building it first if stale) a minimal root
#   download_closure DIR DEB         apt's cache in DIR gets everything DEB pulls in
#   boot DIR NAME [OPTION...]        boot it (nspawn OPTIONs; default a private
#                                    network); sets nspawn_pid and pid1
#   X CMD...                         run CMD inside the container booted last
#   install_deb ARGS...              apt-get install inside, waiting for the dpkg lock

# IMGWORKER_ROOTS_CACHE: another place for the cached roots (the test that
# starts from an empty cache uses a directory of its own).
roots_cache=${IMGWORKER_ROOTS_CACHE:-/var/cache/imgworker-roots}

say() { printf '== %s\n' "$*"; }
tail_to_stderr() { tail -n 25 "$1" >&2; }

need_host_tools() {
    # mmdebstrap's Recommends that root mode uses (suite names, keys, arch checks).
    "$repo/script/need-packages" mmdebstrap systemd-container arch-test gpg libdistro-info-perl \
        libdpkg-perl mount
}

root_from_cache() {   # release dir
    local tarball="$roots_cache/$1.tar"
    mkdir -p "$roots_cache" "$2"
    # A root older than a day misses security updates the mirror has moved on from.
    # mmdebstrap picks its output format from the name it is given (a name
    # not ending in .tar becomes a directory), so the format is said
    # outright, and the temp name is removed first whatever a failed run left.
    if [ ! -f "$tarball" ] || [ ! -s "$tarball" ] || [ -n "$(find "$tarball" -mtime +1)" ]; then
        rm -rf "$tarball.new" "$tarball"
        mmdebstrap --variant=minbase --format=tar \
            --include=systemd,systemd-sysv,dbus,curl,ca-certificates,procps \
            "$1" "$tarball.new" >"$work/mmdebstrap-$1.log" 2>&1 \
            || { tail_to_stderr "$work/mmdebstrap-$1.log"; rm -rf "$tarball.new"; return 1; }
        mv "$tarball.new" "$tarball"
    fi
    tar -C "$2" -xf "$tarball"
}

download_closure() {   # root deb: the booted container cannot download
    cp "$2" "$1/root/imgworker.deb"          # not /tmp: nspawn mounts a tmpfs there
    chroot "$1" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --download-only /root/imgworker.deb' \
        >"$work/download.log" 2>&1 || { tail_to_stderr "$work/download.log"; return 1; }
}

boot() {   # root machine-name [nspawn-option...]
    local root=$1 name=$2
    shift 2
    [ $# -gt 0 ] || set -- --private-network
    systemd-nspawn -q -b -D "$root" --register=no --keep-unit -M "$name" "$@" \
        >"$work/console-$name.log" 2>&1 &
    nspawn_pid=$!
    pid1=""
    for _ in $(seq 50); do pid1=$(pgrep -P "$nspawn_pid" -x systemd || true); [ -n "$pid1" ] && break; sleep 0.2; done
    [ -n "$pid1" ] || return 1
    local state
    for _ in $(seq 60); do
        state=$(X systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) return 0 ;; esac
        sleep 1
    done
}

X() { nsenter -t "$pid1" -a env DEBIAN_FRONTEND=noninteractive setsid -w "$@" </dev/null; }

# The booted roots have apt-daily and dpkg-db-backup timers: apt may find
# the dpkg lock held at first boot.
install_deb() { X apt-get -o DPkg::Lock::Timeout=300 install -y -q "$@"; }

power_off() {
    [ -n "${nspawn_pid:-}" ] && kill "$nspawn_pid" 2>/dev/null && wait "$nspawn_pid" 2>/dev/null || true
    nspawn_pid=""
}

# What a user checks after README's two lines (apt install, systemctl start
# imgworker@{1..5}): every worker active, an upload through nginx answered
# 202 within 10 s of the start, its job done, and RabbitMQ serving imgworker
# only as user imgworker on vhost imgworker (never guest). Needs
# /root/photo.jpg in the root; returns non-zero with the reason on stderr.
the_stack_serves() {   # root
    local started id line code
    X systemctl start imgworker@1 imgworker@2 imgworker@3 imgworker@4 imgworker@5 \
        || { echo "systemctl start imgworker@{1..5} failed" >&2; return 1; }
    started=$(date +%s.%N)
    for i in 1 2 3 4 5; do
        [ "$(X systemctl is-active "imgworker@$i")" = active ] \
            || { echo "imgworker@$i is $(X systemctl is-active "imgworker@$i")" >&2; return 1; }
    done
    code=""
    while /usr/bin/python3 -c "import sys, time; sys.exit(time.time() - $started > 10)"; do
        code=$(X curl -s -o /root/first-upload -w '%{http_code}' -F file=@/root/photo.jpg http://127.0.0.1/upload || true)
        [ "$code" = 202 ] && break
        sleep 0.5
    done
    [ "$code" = 202 ] || { echo "no 202 within 10 s of starting the workers: $code $(cat "$1/root/first-upload")" >&2; return 1; }
    say "202 through nginx $(/usr/bin/python3 -c "import time; print(round(time.time() - $started, 1))") s after starting the workers"
    id=$(/usr/bin/python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$1/root/first-upload")
    local record="$1/var/lib/imgworker/jobs/$id.json"
    for _ in $(seq 300); do
        [ "$(/usr/bin/python3 "$repo/harness/job_field.py" "$record")" = done ] && break
        sleep 0.1
    done
    [ "$(/usr/bin/python3 "$repo/harness/job_field.py" "$record")" = done ] \
        || { echo "job $id is not done: $(cat "$record")" >&2; return 1; }
    X rabbitmqctl -q list_connections user vhost >"$work/connections" \
        || { echo "rabbitmqctl list_connections failed" >&2; return 1; }
    sed -i '/^user\s*vhost$/d' "$work/connections"      # the header, where -q keeps it
    [ "$(wc -l <"$work/connections")" -ge 6 ] && ! grep -vqP '^imgworker\timgworker$' "$work/connections" \
        || { echo "connections other than imgworker on vhost imgworker (or fewer than 6):" >&2; cat "$work/connections" >&2; return 1; }
    say "job $id done; RabbitMQ connections: $(sort "$work/connections" | uniq -c | tr -s ' \t' ' ')"
}
