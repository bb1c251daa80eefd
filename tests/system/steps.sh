# Steps the scripts of this folder share, sourced after harness/nspawn.sh
# (they run inside the container booted last, through X). The caller defines
# fail (prints its reason, exits) and sets $root and $repo.
#   job_field FILE [FIELD]        a field of a job's JSON (state by default), parsed
#   main_pid UNIT, restarts UNIT  systemctl show's MainPID / NRestarts
#   wait_active UNIT SECONDS      fail unless UNIT is active within SECONDS
#   upload_done                   upload the photo through nginx, wait for its job
#                                 to be done; prints the job id
#   stored_files                  how many files there are under /var/lib/imgworker
#   use_key NAME SCOPES           imgworker keys add NAME inside; every later curl
#                                 inside carries it; sets $key

job_field() { /usr/bin/python3 "$repo/harness/job_field.py" "$@"; }
main_pid() { X systemctl show -p MainPID --value "$1"; }
restarts() { X systemctl show -p NRestarts --value "$1"; }

wait_active() {   # unit, seconds
    for _ in $(seq $(( $2 * 2 ))); do
        [ "$(X systemctl is-active "$1")" = active ] && return
        sleep 0.5
    done
    fail "$1 not active after $2 s: $(X systemctl is-active "$1")"
}

upload_done() {   # upload the photo through nginx, wait for done; prints the job id
    X curl -s -o /root/body -F file=@/root/photo.jpg http://127.0.0.1/upload
    local id
    id=$(/usr/bin/python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$root/root/body") \
        || { cat "$root/root/body"; fail "upload refused"; }
    for _ in $(seq 300); do
        X curl -s -o /root/job "http://127.0.0.1/jobs/$id"
        [ "$(job_field "$root/root/job")" = done ] && { echo "$id"; return; }
        sleep 0.1
    done
    cat "$root/root/job"; fail "job $id not done"
}

stored_files() {
    find "$root/var/lib/imgworker" -type f 2>/dev/null | wc -l
}

# curl reads $CURL_HOME/.curlrc first: X passes this script's environment
# into the container, whatever $HOME the caller has.
use_key() {   # name scopes
    key=$(X imgworker keys add "$1" --scope "$2") || fail "imgworker keys add $1 --scope $2"
    case $key in imgwk_*) ;; *) fail "imgworker keys add printed no key: $key" ;; esac
    X sh -c "umask 077; printf '%s\n' '$key' >/root/imgworker.key; \
        printf 'header = \"Authorization: Bearer %s\"\n' '$key' >/root/.curlrc"
    export CURL_HOME=/root
}
