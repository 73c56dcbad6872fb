#!/bin/sh
# compute-broker worker watchdog: powers this worker off when no broker wants it any more.
#
# A dead-man's switch (docs/worker-watchdog.md); POSIX sh, nothing to install. Every
# `interval` seconds it sends `ALIVE <instance-id>` to the brokers in turn until one answers:
# `OK...` means still wanted, `ERROR: Worker not wanted...` means the pool has no worker,
# launch or intent for this instance; any other reply, or none, is no answer. It powers off
# when no broker has answered OK for `orphan_timeout` seconds, when two checks in a row were
# told "not wanted", or when the machine has been up `max_lifetime` seconds (0: no limit;
# counted from boot by /proc/uptime, or from the script's start where there is none). The
# instance is launched with InstanceInitiatedShutdownBehavior=terminate, so powering off
# terminates it.
#
# Run without arguments (as cloud-init runs user data) it starts itself detached and returns
# at once; `--foreground` runs the checks in this process. broker/userdata.py removes the
# comment lines and the indentation when it puts this script into user data (EC2 allows
# 16 KB of user data), so no line may depend on its indentation.

# --- settings (broker/userdata.py rewrites this block) ---
brokers='127.0.0.1:9000'
interval=60
orphan_timeout=1800
max_lifetime=0
# --- end of settings ---

# The per-boot copy that restarts the watchdog after a reboot records its instance here.
installed_for=''

# Fixed behaviour. The CB_WATCHDOG_* variables exist for tests; nothing sets them on a worker.
shutdown_command='shutdown -P now || poweroff'
[ -n "${CB_WATCHDOG_SHUTDOWN-}" ] && shutdown_command=$CB_WATCHDOG_SHUTDOWN
reply_timeout=${CB_WATCHDOG_REPLY_TIMEOUT:-5}
imds=${CB_WATCHDOG_IMDS:-169.254.169.254:80}
instance_id=${CB_WATCHDOG_INSTANCE_ID-}
transport=${CB_WATCHDOG_TRANSPORT-}
http=${CB_WATCHDOG_HTTP-}
uptime_file=${CB_WATCHDOG_UPTIME_FILE:-/proc/uptime}
per_boot_dir=${CB_WATCHDOG_PER_BOOT_DIR-/var/lib/cloud/scripts/per-boot}
log_file=${CB_WATCHDOG_LOG-}
tag=compute-broker-watchdog
nl='
'
cr=$(printf '\r')

has() { command -v "$1" >/dev/null 2>&1; }

log() {
    if [ -z "$log_file" ] && has logger; then
        logger -t "$tag" "$*" && return
    fi
    printf '%s %s: %s\n' "$(date '+%Y-%m-%dT%H:%M:%S%z')" "$tag" "$*" \
        >>"${log_file:-/var/log/$tag.log}"
} 2>/dev/null

# Time is kept in whole centiseconds: shell arithmetic has no fractions.
to_cs() {
    _int=${1%%.*}
    _frac=
    case $1 in *.*) _frac=${1#*.} ;; esac
    _frac=${_frac}00
    _frac=${_frac%"${_frac#??}"}
    _frac=${_frac#0}
    echo $((${_int:-0} * 100 + ${_frac:-0}))
}

# The clock: seconds since boot from /proc/uptime, else the wall clock (date +%s).
now_cs() {
    if [ "$clock" = uptime ] && read -r _up _rest <"$uptime_file"; then
        to_cs "$_up"
    else
        echo $(($(date +%s) * 100))
    fi
}

sleep_cs() {
    sleep "$(($1 / 100)).$(($1 % 100 / 10))$(($1 % 10))" 2>/dev/null || sleep $((($1 + 99) / 100))
}

# bounded CS CMD [ARG...]: run CMD with stdin from $stdin_file, killed after CS centiseconds.
bounded() {
    _limit=$1
    shift
    "$@" <"${stdin_file:-/dev/null}" &
    _pid=$!
    (sleep_cs "$_limit" && kill "$_pid") >/dev/null 2>&1 </dev/null &
    _killer=$!
    wait "$_pid"
    _rc=$?
    kill "$_killer" 2>/dev/null
    return $_rc
}

bash_exchange='exec 3<>"/dev/tcp/$1/$2" || exit 1
printf %s "$3" >&3
if [ "$4" = line ]; then IFS= read -r -t "$5" reply <&3 || exit 1; printf "%s\n" "$reply"
else exec cat <&3; fi'

python_exchange='import socket, sys
host, port, data, mode, limit = sys.argv[1:]
s = socket.create_connection((host, int(port)), float(limit))
s.sendall(data.encode())
got = chunk = b"."
while chunk and (mode != "line" or b"\n" not in got): chunk = s.recv(4096); got += chunk
sys.stdout.write(got[1:].decode("utf-8", "replace"))'

pick_transport() {
    [ -n "$transport" ] && return
    for transport in bash nc python3 none; do
        [ "$transport" = none ] || has "$transport" && return
    done
}

# exchange HOST PORT DATA MODE: send DATA, print the first reply line (MODE line) or all of
# the reply until the peer closes (MODE all); fails when nothing works.
exchange() {
    case $transport in
    bash) bounded "$limit_cs" bash -c "$bash_exchange" "$tag" "$1" "$2" "$3" "$4" "$reply_timeout" ;;
    python3) bounded "$limit_cs" python3 -c "$python_exchange" "$1" "$2" "$3" "$4" "$reply_timeout" ;;
    nc)
        printf %s "$3" >"$workdir/request" || return 1
        _got=$(stdin_file=$workdir/request bounded "$limit_cs" nc -w "$limit_s" "$1" "$2") || [ -n "$_got" ] || return 1
        [ "$4" = line ] && _got=${_got%%"$nl"*}
        printf '%s\n' "$_got"
        ;;
    *) return 1 ;;
    esac
} 2>/dev/null

# http_imds METHOD PATH HEADER: the body of an IMDS response (HTTP 200 only).
http_imds() {
    _url=http://$imds$2
    for _client in ${http:-curl wget tcp}; do
        case $_client in
        curl) has curl && curl -fsS --noproxy '*' -m "$limit_s" -X "$1" -H "$3" "$_url" && return ;;
        wget) has wget && wget -q --no-proxy -T "$limit_s" -O - --method="$1" --header="$3" "$_url" && return ;;
        tcp)
            _resp=$(exchange "${imds%:*}" "${imds##*:}" "$1 $2 HTTP/1.0$cr${nl}Host: ${imds%:*}$cr$nl$3$cr${nl}Content-Length: 0$cr$nl$cr$nl" all) || continue
            case ${_resp%%"$nl"*} in "HTTP/"*" 200"*) ;; *) continue ;; esac
            printf '%s\n' "$_resp" | tr -d '\r' | sed '1,/^$/d'
            return
            ;;
        esac
    done
    return 1
} 2>/dev/null

valid_id() {
    case $1 in i-?*) ;; *) return 1 ;; esac
    case ${1#i-} in *[!0-9a-f]*) return 1 ;; esac
}

fetch_instance_id() {
    _token=$(http_imds PUT /latest/api/token 'X-aws-ec2-metadata-token-ttl-seconds: 60') &&
        _id=$(http_imds GET /latest/meta-data/instance-id "X-aws-ec2-metadata-token: $_token") &&
        valid_id "$_id" && instance_id=$_id
}

# Restart after a reboot: cloud-init runs user data once per instance, but runs the scripts
# in per-boot on every boot. The copy records its instance: an image made from this worker
# must not carry a watchdog into instances the broker never launched.
install_for_reboots() {
    _dest=$per_boot_dir/$tag.sh
    [ -n "$per_boot_dir" ] && [ -d "$per_boot_dir" ] && [ -f "$0" ] && [ "$0" != "$_dest" ] || return 0
    if sed "s/^installed_for=.*/installed_for='$instance_id'/" "$0" >"$_dest.new" &&
        chmod 755 "$_dest.new" && mv -f "$_dest.new" "$_dest"; then
        log "installed $_dest to restart the watchdog after a reboot"
    else
        log "could not install $_dest: a reboot ends the watchdog"
    fi
}

power_off() {
    log "powering off: $1"
    CB_WATCHDOG_REASON=$1 sh -c "$shutdown_command" && exit 0
    log "the power-off command failed ($shutdown_command); trying again at the next check"
}

# Ask the brokers in order until one answers; sets answer to ok, not_wanted or none.
check() {
    answer=none
    for _broker in $brokers; do
        _reply=$(exchange "${_broker%:*}" "${_broker##*:}" "ALIVE $instance_id$nl" line)
        _reply=${_reply%"$cr"}
        case $_reply in
        OK | "OK "*) answer=ok ;;
        "ERROR: Worker not wanted"*) answer=not_wanted ;;
        *) continue ;;
        esac
        answered_by=$_broker
        return
    done
}

main() {
    set -f
    clock=date
    [ -r "$uptime_file" ] && clock=uptime
    limit_cs=$(to_cs "$reply_timeout")
    limit_s=$((($limit_cs + 99) / 100))
    interval_cs=$(to_cs "$interval")
    orphan_cs=$(to_cs "$orphan_timeout")
    lifetime_cs=$(to_cs "$max_lifetime")
    pick_transport
    if [ "$transport" = nc ]; then
        workdir=$(mktemp -d 2>/dev/null) || { workdir=/tmp/$tag.$$ && mkdir -m 700 "$workdir"; }
        trap 'rm -rf "$workdir"' EXIT
        trap 'exit 143' TERM
    fi
    start=$(now_cs)
    born=$start
    [ "$clock" = uptime ] && born=0
    last_ok=$start
    not_wanted=0
    state=starting
    install_tried=
    log "started: brokers $brokers, every ${interval}s, orphan_timeout ${orphan_timeout}s," \
        "max_lifetime ${max_lifetime}s (0: none; counted from $([ "$clock" = uptime ] && echo boot || echo start)), transport $transport"
    while :; do
        now=$(now_cs)
        [ "$lifetime_cs" -gt 0 ] && [ $((now - born)) -ge "$lifetime_cs" ] && power_off max_lifetime
        answer=none
        if [ -n "$instance_id" ] || fetch_instance_id; then
            if [ -n "$installed_for" ] && [ "$installed_for" != "$instance_id" ]; then
                log "this copy belongs to $installed_for, not to $instance_id: removing it"
                rm -f "$0"
                exit 0
            fi
            if [ -z "$installed_for" ] && [ -z "$install_tried" ]; then
                install_tried=1
                install_for_reboots
            fi
            check
        elif [ "$state" = starting ]; then
            log "cannot read the instance id from the instance metadata service; retrying"
        fi
        now=$(now_cs)
        case $answer in
        ok)
            [ "$state" = ok ] || log "$answered_by answers OK: still wanted"
            last_ok=$now
            not_wanted=0
            ;;
        not_wanted)
            not_wanted=$((not_wanted + 1))
            log "$answered_by says this worker is not wanted ($not_wanted in a row)"
            [ "$not_wanted" -ge 2 ] && power_off "not wanted"
            ;;
        *)
            [ "$state" = none ] || log "no broker answered; powering off after ${orphan_timeout}s without an OK"
            not_wanted=0
            ;;
        esac
        state=$answer
        [ $((now - last_ok)) -ge "$orphan_cs" ] && power_off orphaned
        # Sleep until the next check, or until a deadline if one comes sooner.
        _wait=$interval_cs
        _left=$((last_ok + orphan_cs - now))
        [ "$_left" -gt 0 ] && [ "$_left" -lt "$_wait" ] && _wait=$_left
        _left=$((born + lifetime_cs - now))
        [ "$lifetime_cs" -gt 0 ] && [ "$_left" -gt 0 ] && [ "$_left" -lt "$_wait" ] && _wait=$_left
        sleep_cs "$_wait"
    done
}

if [ "${1-}" = --foreground ]; then
    main
    exit
fi
# Started by cloud-init (or by hand): check in the background, in a session of its own so that
# the end of the user-data script (or of a login) does not stop it, and return at once.
if [ -f "$0" ] && [ -r "$0" ]; then
    if has setsid; then
        setsid sh "$0" --foreground </dev/null >/dev/null 2>&1 &
    else
        nohup sh "$0" --foreground </dev/null >/dev/null 2>&1 &
    fi
else
    (
        trap '' HUP
        main
    ) </dev/null >/dev/null 2>&1 &
fi
exit 0
