# compute_broker.tcl --
#
#   Tcl 8.6/9 client for the compute-broker wire protocol (see protocol.md at the repository
#   root). One TCP connection per request, like the seed clients. Every connect and read is
#   event driven (socket -async, fileevent, after) and bounded by a timeout, so a dead or
#   silent broker cannot freeze an experiment.
#
#   Each request command (get_worker ping release status burst help) runs in one of three ways:
#     - plain: waits in a vwait of its own and returns the result or raises the error;
#     - in a coroutine (info coroutine non-empty): yields to the event loop instead, so other
#       events and coroutines run while it waits, then returns or raises the same way;
#     - with -command cmd: returns a token at once; later, from the event loop, calls
#       {*}cmd ok result   or   {*}cmd error message errorcode   (at global level).
#
#   With a token (-token, configure -token, or COMPUTE_BROKER_TOKEN), every connection sends
#   "AUTH <token>" first and the request only after the broker's OK. The token never appears
#   in an error message, an errorcode or configure's answer; a reply that echoes it reads
#   <token>.
#
#   Errors are raised (or passed to -command) with -errorcode {COMPUTE_BROKER <TYPE> <detail>}:
#     BROKER_ERROR  the broker answered a line beginning with ERROR (message = that line)
#     AUTH          the broker did not accept the token, or wants one: {COMPUTE_BROKER AUTH
#                   line}, line its ERROR reply (to AUTH, or "ERROR: auth required" to any
#                   request)
#     INTERRUPTED   PING found the worker interrupted: {COMPUTE_BROKER INTERRUPTED ip deadline},
#                   deadline YYYY-MM-DDTHH:MM:SSZ (UTC) or "" when none was given
#     TIMEOUT       no connection or no reply within the timeout
#     UNAVAILABLE   connection refused/unreachable, or closed without a reply line
#     PROTOCOL      a reply that does not fit the protocol (e.g. GET_WORKER answered "OK")
#     USAGE         a bad argument or option given to a proc of this package

package require Tcl 8.6-

namespace eval ::compute_broker {
    namespace export configure get_worker ping release status burst help cancel \
        with_worker replace_worker interrupted keepalive_start keepalive_stop

    variable version 0.1.0

    # Settings given to configure; a key that is absent takes its default: -host/-port from
    # COMPUTE_BROKER_HOST / COMPUTE_BROKER_PORT, else localhost:9000; -client from
    # COMPUTE_BROKER_CLIENT_ID, else randomClient; -token from COMPUTE_BROKER_TOKEN, else none.
    variable config [dict create -timeout 10000]

    # This interpreter's random client id (set below, once NewClientId exists).
    variable randomClient ""

    # GET_WORKER's default timeout: its wait, or the broker's default launch_timeout in
    # seconds, plus the quick timeout (configure -timeout) as a margin.
    variable launchTimeout 300

    # A reply line longer than this is refused (protects memory against a garbage server).
    variable maxReply 16777216

    # BURST's largest n (protocol.md: BURST <n> (1-100)); a larger one is a USAGE error here,
    # as 0 is, rather than a request the broker refuses.
    variable maxBurst 100

    # The longest timeout, in ms, that after accepts on every Tcl (about 24.8 days).
    variable maxTimeout 2147483647

    # Counter for unique names: per-call state ::compute_broker::callN (a request; its name is
    # the token -command calls return) and ::compute_broker::waitN (a waiting call's state),
    # keep-alive keys withN.
    variable seq 0

    # Keep-alive schedules: key -> dict (see KeepaliveStart).
    variable keepalives
    array set keepalives {}

    # with_worker blocks running: key (withN) -> dict ip, get (GET_WORKER options), conn
    # (PING/RELEASE options), who (host port client-id: whose lease), kopts (keep-alive
    # options, {} without keep-alive).
    variable blocks
    array set blocks {}

    # Workers whose last PING from this interpreter answered "ERROR: Worker interrupted":
    # ip -> deadline ("" if none). A PING answered OK, a RELEASE, or GET_WORKER handing the
    # address out again forgets it.
    variable interruptions
    array set interruptions {}
}

# ---------------------------------------------------------------------------------------
# Public procs
# ---------------------------------------------------------------------------------------

# compute_broker::configure ?-host h? ?-port p? ?-timeout ms? ?-client id? ?-token t?
#   With no arguments: the current effective settings as a dict, without the token (which
#   is never shown). An empty -host or -port goes back
#   to the environment/default; -client "" sends no client=ID (the broker then knows this
#   program by its IP address alone, like the seed clients); -token "" sends no token, even
#   when COMPUTE_BROKER_TOKEN is set.
proc ::compute_broker::configure {args} {
    variable config
    if {[llength $args] == 0} {
        lassign [Endpoint {}] host port timeout
        return [dict create -host $host -port $port -timeout $timeout -client [ClientId {}]]
    }
    set opts [ParseOptions configure $args {-host -port -timeout -client -token}]
    # ParseOptions has checked every value: nothing changes unless all are good.
    dict for {opt value} $opts {
        if {$opt in {-host -port} && $value eq ""} {
            dict unset config $opt
        } else {
            dict set config $opt $value
        }
    }
    return
}

# Every request command also takes -command cmd (see the top of this file): it then returns
# a token at once (for compute_broker::cancel) and the result or error goes to the callback.
# Bad arguments are raised at once either way; the callback is never called before the
# command has returned. Every request command also takes -token t: the access token for that
# call ("" for none), instead of configure's or COMPUTE_BROKER_TOKEN.

# compute_broker::get_worker ?-host h? ?-port p? ?-type t? ?-market m? ?-wait s?
#                            ?-timeout ms? ?-client id? ?-command cmd?
#   Returns the worker's IP. The broker may legitimately take minutes while a worker boots,
#   so the default timeout is the wait (or 300 s, the broker's default launch_timeout) plus
#   the quick timeout (configure -timeout, 10 s) as a margin; -timeout ms replaces it.
proc ::compute_broker::get_worker {args} {
    variable launchTimeout
    variable maxTimeout
    set opts [ParseOptions get_worker $args \
        {-host -port -type -market -wait -timeout -client -token -command}]
    set line GET_WORKER
    foreach {opt key} {-type type -market market -wait wait} {
        if {[dict exists $opts $opt]} {
            set value [dict get $opts $opt]
            CheckWord $opt $value
            append line " $key=$value"
        }
    }
    if {[dict exists $opts -wait]} {
        set wait [Seconds -wait [dict get $opts -wait]]
    } else {
        set wait $launchTimeout
    }
    append line [ClientArg $opts]
    if {[dict exists $opts -timeout]} {
        set timeout [dict get $opts -timeout]
    } else {
        lassign [Endpoint {}] - - margin
        # The broker cuts a longer wait down to its launch_timeout: so may this limit.
        set timeout [expr {min($maxTimeout, int(ceil(min($wait, 1e9) * 1000.0)) + $margin)}]
    }
    Call $opts $line GET_WORKER [namespace current]::WorkerReply $timeout
}

# compute_broker::ping ip ?-host h? ?-port p? ?-timeout ms? ?-client id? ?-command cmd?
#   -> OK. An interrupted worker raises {COMPUTE_BROKER INTERRUPTED ip deadline}.
proc ::compute_broker::ping {ip args} {
    IpCommand PING $ip $args
}

# compute_broker::release ip ?-host h? ?-port p? ?-timeout ms? ?-client id? ?-command cmd?
#   -> OK
proc ::compute_broker::release {ip args} {
    IpCommand RELEASE $ip $args
}

# compute_broker::interrupted ip ?deadline_var?
#   1 if the last PING of ip from this interpreter (a keep-alive's or ping's) found the worker
#   interrupted, else 0. With deadline_var, sets it to the deadline (YYYY-MM-DDTHH:MM:SSZ, or
#   "" when none was given).
proc ::compute_broker::interrupted {ip {deadline_var ""}} {
    variable interruptions
    if {![info exists interruptions($ip)]} {
        return 0
    }
    if {$deadline_var ne ""} {
        upvar 1 $deadline_var deadline
        set deadline $interruptions($ip)
    }
    return 1
}

# compute_broker::status ?-host h? ?-port p? ?-timeout ms? ?-command cmd?  -> the JSON line
proc ::compute_broker::status {args} {
    set opts [ParseOptions status $args {-host -port -timeout -token -command}]
    Call $opts STATUS STATUS [namespace current]::StatusReply
}

# compute_broker::burst n ?-host h? ?-port p? ?-timeout ms? ?-command cmd?
#   -> list of instance ids. n is 1-100 (the broker's limit).
proc ::compute_broker::burst {n args} {
    variable maxBurst
    set opts [ParseOptions burst $args {-host -port -timeout -token -command}]
    if {![regexp {^0*([0-9]{1,3})$} $n -> digits] || [scan $digits %d count] != 1
            || $count < 1 || $count > $maxBurst} {
        Usage "bad count \"$n\": must be a whole number from 1 to $maxBurst"
    }
    Call $opts "BURST $count" BURST [namespace current]::BurstReply
}

# compute_broker::help ?-host h? ?-port p? ?-timeout ms? ?-command cmd?
#   -> "commands: ..." (OK stripped)
proc ::compute_broker::help {args} {
    set opts [ParseOptions help $args {-host -port -timeout -token -command}]
    Call $opts HELP HELP [namespace current]::HelpReply
}

# compute_broker::cancel token  -> 1 if the request was abandoned, 0 if it had already ended
#   Abandons a request started with -command: its callback is not called. Its connection is
#   closed; a GET_WORKER the broker has already answered may leave a lease behind, which
#   expires after the broker's idle_timeout.
proc ::compute_broker::cancel {token} {
    if {![regexp {^::compute_broker::call[0-9]+$} $token]} {
        Usage "cancel: \"$token\" is not a token of a compute_broker request"
    }
    upvar #0 $token S
    if {![info exists S(chan)]} {
        return 0
    }
    if {![info exists S(cancellable)]} {
        Usage "cancel: \"$token\" is not a request started with -command"
    }
    Cancel $token
    return 1
}

# Reply checkers: each gets the reply line (not an ERROR one) and returns the command's result
# or raises the error it stands for.
proc ::compute_broker::WorkerReply {reply} {
    variable interruptions
    if {![regexp {^[0-9A-Fa-f.:]+$} $reply]} {
        Protocol GET_WORKER $reply
    }
    unset -nocomplain interruptions($reply)
    return $reply
}

proc ::compute_broker::OkReply {command reply} {
    if {![regexp {^OK(\s|$)} $reply]} {
        Protocol $command $reply
    }
    return $reply
}

proc ::compute_broker::StatusReply {reply} {
    if {[string index $reply 0] ne "\{"} {
        Protocol STATUS $reply
    }
    return $reply
}

proc ::compute_broker::BurstReply {reply} {
    if {![regexp {^OK[ \t]+([0-9]+)((?:[ \t]+\S+)*)[ \t]*$} $reply -> count ids]} {
        Protocol BURST $reply
    }
    set ids [regexp -all -inline {\S+} $ids]
    if {[scan $count %d count] != 1 || [llength $ids] != $count} {
        Protocol BURST $reply
    }
    return $ids
}

proc ::compute_broker::HelpReply {reply} {
    if {![regexp {^OK(?:[ \t]+(.*))?$} $reply -> text]} {
        Protocol HELP $reply
    }
    return $text
}

# compute_broker::keepalive_start ip ?-interval ms? ?-command cmd? ?-host h? ?-port p?
#                                 ?-timeout ms? ?-client id? ?-token t?
#   PINGs ip every -interval ms (default 60000) from the event loop until keepalive_stop.
#   -command is called after each PING as: {*}cmd ip ok|error|interrupted result, where
#   result is the reply, the error message, or the interruption's deadline ("" if none)
proc ::compute_broker::keepalive_start {ip args} {
    set opts [ParseOptions keepalive_start $args \
        {-interval -command -host -port -timeout -client -token}]
    CheckWord ip $ip
    KeepaliveStart ip:$ip $ip $opts
    return
}

# compute_broker::keepalive_stop ip
proc ::compute_broker::keepalive_stop {ip} {
    KeepaliveStop ip:$ip
    return
}

# compute_broker::with_worker ip_var body ?-type t? ?-market m? ?-wait s? ?-timeout ms?
#     ?-host h? ?-port p? ?-client id? ?-token t? ?-keepalive ms? ?-keepalivecommand cmd?
#     ?-oninterrupt cmd?
#   Gets a worker, sets ip_var in the caller, runs body in the caller's scope while PINGing
#   the worker every -keepalive ms (0: no keep-alive), then RELEASEs the worker however the
#   body ends. -timeout bounds the GET_WORKER only; PING and RELEASE use the configured one.
#   When a keep-alive PING finds the worker interrupted, -oninterrupt is called once for that
#   worker as {*}cmd ip deadline; the body switches workers with replace_worker ip_var.
proc ::compute_broker::with_worker {ip_var body args} {
    variable seq
    variable blocks
    set opts [ParseOptions with_worker $args {-host -port -type -market -wait -timeout
        -client -token -keepalive -keepalivecommand -oninterrupt}]
    set interval 60000
    if {[dict exists $opts -keepalive]} {
        set interval [dict get $opts -keepalive]
        if {![string is integer -strict $interval] || $interval < 0} {
            Usage "bad -keepalive \"$interval\": must be a number of milliseconds (0: off)"
        }
    }
    if {$interval == 0 && [dict exists $opts -oninterrupt]} {
        Usage "-oninterrupt needs the keep-alive: -keepalive must not be 0"
    }
    set conn [dict filter $opts key -host -port -client -token]
    # Resolve and check the connection settings before a worker is launched.
    Endpoint $conn
    ClientId $conn
    Token $conn

    set get [dict filter $opts key -host -port -client -token -type -market -wait -timeout]
    set kopts {}
    if {$interval > 0} {
        set kopts [dict merge $conn [list -interval $interval]]
        foreach {opt kopt} {-keepalivecommand -command -oninterrupt -oninterrupt} {
            if {[dict exists $opts $opt]} {
                dict set kopts $kopt [dict get $opts $opt]
            }
        }
    }
    set ip [get_worker {*}$get]

    set key with[incr seq]
    # A lease belongs to the token's name too: blocks with other tokens share no lease.
    set who [list {*}[lrange [Endpoint $conn] 0 1] [ClientId $conn] [Token $conn]]
    set blocks($key) [dict create ip $ip get $get conn $conn who $who kopts $kopts]
    set code [catch {
        if {$kopts ne ""} {
            KeepaliveStart $key $ip $kopts
        }
        upvar 1 $ip_var worker
        set worker $ip
        uplevel 1 $body
    } result ropts]
    KeepaliveStop $key
    # The worker held now: replace_worker may have switched it.
    set ip [dict get $blocks($key) ip]
    set shared [Shared $key]
    unset blocks($key)
    set rcode 0
    if {!$shared} {
        set rcode [catch {release $ip {*}$conn} rmsg rinfo]
    }

    switch -- $code {
        0 {
            if {$rcode} {
                return -code error -errorcode [dict get $rinfo -errorcode] $rmsg
            }
            return $result
        }
        1 {
            # Re-raise the body's error as it was (-errorcode, -errorinfo); a failed
            # RELEASE cannot be reported on top of it.
            dict incr ropts -level
            return -options $ropts $result
        }
        2 {
            if {$rcode} {
                return -code error -errorcode [dict get $rinfo -errorcode] $rmsg
            }
            dict incr ropts -level
            return -options $ropts $result
        }
        default {
            if {$rcode} {
                return -code error -errorcode [dict get $rinfo -errorcode] $rmsg
            }
            return -code $code $result
        }
    }
}

# compute_broker::replace_worker ip_var  -> the new IP
#   Called in a with_worker body (ip_var as given to with_worker): gets another worker with
#   the block's GET_WORKER options, then RELEASEs the one $ip_var holds, moves the keep-alive
#   and the final RELEASE to the new one and sets ip_var to its IP. For an interrupted worker
#   the broker hands out another; a healthy one may come back unchanged. If GET_WORKER fails,
#   its error is raised and the block keeps its worker.
proc ::compute_broker::replace_worker {ip_var} {
    variable blocks
    upvar 1 $ip_var worker
    if {![info exists worker]} {
        Usage "replace_worker: no variable \"$ip_var\""
    }
    set old $worker
    set key ""
    foreach candidate [lsort -dictionary -decreasing [array names blocks]] {
        if {[dict get $blocks($candidate) ip] eq $old} {
            set key $candidate
            break
        }
    }
    if {$key eq ""} {
        Usage "replace_worker: no with_worker block holds worker \"$old\""
    }
    set block $blocks($key)
    set new [get_worker {*}[dict get $block get]]
    set conn [dict get $block conn]
    # Another replace_worker of this block (from an event handler) may have won meanwhile.
    set current [expr {[info exists blocks($key)] ? [dict get $blocks($key) ip] : ""}]
    if {$current ne $old} {
        if {$new ni [list $current $old]} {
            catch {release $new {*}$conn}
        }
        if {$current eq ""} {
            return -code error -errorcode [list COMPUTE_BROKER USAGE "block ended"] \
                "compute_broker: replace_worker: the with_worker block has ended"
        }
        set worker $current
        return $current
    }
    dict set blocks($key) ip $new
    if {[dict get $block kopts] ne ""} {
        KeepaliveStart $key $new [dict get $block kopts]
    }
    # Unless the broker handed back the same worker, or an enclosing block holds the old one
    # under the same lease (nested with_workers with one client id share it).
    if {$new ne $old && ![Shared $key $old]} {
        catch {release $old {*}$conn}
    }
    set worker $new
    return $new
}

# 1 if another with_worker block holds ip (default: block key's) under the same lease.
proc ::compute_broker::Shared {key {ip ""}} {
    variable blocks
    if {$ip eq ""} {set ip [dict get $blocks($key) ip]}
    set who [dict get $blocks($key) who]
    foreach other [array names blocks] {
        if {$other ne $key && [dict get $blocks($other) ip] eq $ip
                && [dict get $blocks($other) who] eq $who} {
            return 1
        }
    }
    return 0
}

# ---------------------------------------------------------------------------------------
# Option parsing and validation
# ---------------------------------------------------------------------------------------

proc ::compute_broker::Usage {message} {
    return -code error -level 2 -errorcode [list COMPUTE_BROKER USAGE $message] \
        "compute_broker: $message"
}

proc ::compute_broker::Protocol {command reply} {
    return -code error -level 2 \
        -errorcode [list COMPUTE_BROKER PROTOCOL $reply] \
        "compute_broker: unexpected reply to $command: \"$reply\""
}

proc ::compute_broker::ParseOptions {cmd arglist allowed} {
    if {[llength $arglist] % 2} {
        Usage "$cmd: [Quoted option [lindex $arglist end]] has no value\
            (options: [join $allowed {, }])"
    }
    set opts [dict create]
    foreach {opt value} $arglist {
        if {$opt ni $allowed} {
            Usage "$cmd: bad [Quoted option $opt]: must be [join $allowed {, }]"
        }
        dict set opts $opt $value
    }
    if {[dict exists $opts -token]} {
        CheckToken -token [dict get $opts -token]
    }
    # An empty -host or -port means the default (configure, environment, localhost:9000).
    if {[dict exists $opts -host] && [dict get $opts -host] ne ""} {
        CheckWord -host [dict get $opts -host]
    }
    if {[dict exists $opts -port] && [dict get $opts -port] ne ""} {
        CheckPort [dict get $opts -port]
    }
    if {[dict exists $opts -timeout]} {
        CheckMs -timeout [dict get $opts -timeout]
    }
    if {[dict exists $opts -client]} {
        CheckClient [dict get $opts -client]
    }
    if {[dict exists $opts -interval]} {
        CheckMs -interval [dict get $opts -interval]
    }
    if {[dict exists $opts -command]} {
        set command [dict get $opts -command]
        if {[catch {llength $command} words] || $words == 0} {
            Usage "bad -command \"$command\": must be a command prefix (a non-empty list)"
        }
    }
    return $opts
}

# 'option "-x"' for a word that looks like an option's name, else 'option (not shown)': a
# misplaced word may be a token, and an error message must never carry one.
proc ::compute_broker::Quoted {what word} {
    if {[regexp {^-[A-Za-z]{1,30}$} $word]} {
        return "$what \"$word\""
    }
    return "$what (a word that is not an option's name; not shown)"
}

# A token: 16-256 printable ASCII characters without blanks, or "" for none. The message
# says what is wrong with it, never what it is.
proc ::compute_broker::CheckToken {what value} {
    set length [string length $value]
    if {$value ne "" && ($length < 16 || $length > 256 || ![regexp {^[\x21-\x7e]+$} $value])} {
        Usage "bad $what: must be 16-256 printable ASCII characters without blanks\
            (the value is not shown)"
    }
}

# A value sent inside a request line: non-empty, no blanks, no control characters (so a
# value can never inject a second request).
proc ::compute_broker::CheckWord {what value} {
    if {![string is graph -strict $value]} {
        Usage "bad $what \"$value\": must be non-empty, without blanks or control characters"
    }
}

proc ::compute_broker::CheckPort {value} {
    if {![string is integer -strict $value] || $value < 1 || $value > 65535} {
        Usage "bad port \"$value\": must be an integer 1-65535"
    }
}

proc ::compute_broker::CheckMs {what value} {
    variable maxTimeout
    if {![string is integer -strict $value] || $value < 1 || $value > $maxTimeout} {
        Usage "bad $what \"$value\": must be a whole number of milliseconds from 1 to\
            $maxTimeout"
    }
}

# A number of seconds as the broker reads it (a decimal number > 0, finite) -> a double.
proc ::compute_broker::Seconds {what value} {
    if {![regexp {^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$} $value]
            || [scan $value %g seconds] != 1 || !($seconds > 0) || !($seconds < Inf)} {
        Usage "bad $what \"$value\": must be a positive number of seconds"
    }
    return $seconds
}

proc ::compute_broker::CheckClient {value {what -client}} {
    if {$value ne "" && ![regexp {^[A-Za-z0-9._:-]{1,64}$} $value]} {
        Usage "bad $what \"$value\": must be 1-64 characters of A-Z a-z 0-9 . _ : -\
            (or empty: none)"
    }
}

# Effective host, port and quick timeout for a call: its options, else configure, else the
# environment, else localhost:9000.
proc ::compute_broker::Endpoint {opts} {
    variable config
    global env
    set host ""
    if {[dict exists $opts -host]} {set host [dict get $opts -host]}
    if {$host eq "" && [dict exists $config -host]} {set host [dict get $config -host]}
    if {$host eq "" && [info exists env(COMPUTE_BROKER_HOST)]} {
        set host [string trim $env(COMPUTE_BROKER_HOST)]
        if {$host ne ""} {CheckWord COMPUTE_BROKER_HOST $host}
    }
    if {$host eq ""} {set host localhost}
    set port ""
    if {[dict exists $opts -port]} {set port [dict get $opts -port]}
    if {$port eq "" && [dict exists $config -port]} {set port [dict get $config -port]}
    if {$port eq "" && [info exists env(COMPUTE_BROKER_PORT)]} {
        set port [string trim $env(COMPUTE_BROKER_PORT)]
        if {$port ne ""} {CheckPort $port}
    }
    if {$port eq ""} {set port 9000}
    set timeout [dict get $config -timeout]
    if {[dict exists $opts -timeout]} {set timeout [dict get $opts -timeout]}
    return [list $host $port $timeout]
}

# The client id for a call: its -client, else configure's, else COMPUTE_BROKER_CLIENT_ID,
# else this interpreter's random id. "" means none.
proc ::compute_broker::ClientId {opts} {
    variable config
    variable randomClient
    global env
    if {[dict exists $opts -client]} {return [dict get $opts -client]}
    if {[dict exists $config -client]} {return [dict get $config -client]}
    if {[info exists env(COMPUTE_BROKER_CLIENT_ID)] && $env(COMPUTE_BROKER_CLIENT_ID) ne ""} {
        CheckClient $env(COMPUTE_BROKER_CLIENT_ID) COMPUTE_BROKER_CLIENT_ID
        return $env(COMPUTE_BROKER_CLIENT_ID)
    }
    return $randomClient
}

# The access token for a call: its -token, else configure's, else COMPUTE_BROKER_TOKEN (blanks
# around it dropped). "" means none.
proc ::compute_broker::Token {opts} {
    variable config
    global env
    if {[dict exists $opts -token]} {return [dict get $opts -token]}
    if {[dict exists $config -token]} {return [dict get $config -token]}
    if {[info exists env(COMPUTE_BROKER_TOKEN)]} {
        set token [string trim $env(COMPUTE_BROKER_TOKEN)]
        CheckToken COMPUTE_BROKER_TOKEN $token
        return $token
    }
    return ""
}

# " client=ID" for a request line, or "" when the id is empty.
proc ::compute_broker::ClientArg {opts} {
    set id [ClientId $opts]
    if {$id eq ""} {return ""}
    return " client=$id"
}

# A random client id per interpreter, e.g. tcl-4242-1f9a0c3b7d2e. Reads /dev/urandom when
# it can, so the interpreter's rand() sequence (an experiment's srand seed) is not touched.
proc ::compute_broker::NewClientId {} {
    set hex ""
    catch {
        set f [open /dev/urandom rb]
        try {
            binary scan [read $f 6] H* hex
        } finally {
            close $f
        }
    }
    if {[string length $hex] != 12} {
        set x [expr {([clock microseconds] ^ ([clock clicks] << 20) ^ ([pid] << 32))}]
        set hex [format %012llx [expr {($x * 0x9E3779B97F4A7C15) & 0xffffffffffff}]]
    }
    return "tcl-[pid]-$hex"
}
set ::compute_broker::randomClient [::compute_broker::NewClientId]

# ---------------------------------------------------------------------------------------
# Requests: one connection per request, event driven, bounded by a timeout
# ---------------------------------------------------------------------------------------

# Sends line and returns its result, or starts it and returns its token (-command in opts);
# see the top of this file. finish is a command prefix called with the reply line (unless it
# is an ERROR line, which CheckReply turns into its error) that returns the command's result
# or raises its error. timeout defaults to the quick one (configure -timeout).
proc ::compute_broker::Call {opts line command finish {timeout ""}} {
    lassign [Endpoint $opts] host port quick
    set auth [Token $opts]
    if {$timeout eq ""} {set timeout $quick}
    if {[dict exists $opts -command]} {
        set token [Start $host $port $auth $line $timeout $command \
            [list [namespace current]::Deliver $line $finish [dict get $opts -command]]]
        # Only these may be cancelled: other requests have a waiter (or a keep-alive).
        set ${token}(cancellable) 1
        return $token
    }
    lassign [Wait $host $port $auth $line $timeout $command] code result errorcode
    lassign [Outcome $line $finish $code $result $errorcode] code result errorcode
    if {$code ne "ok"} {
        return -code error -errorcode $errorcode $result
    }
    return $result
}

# PING or RELEASE: "COMMAND ip ?client=ID?", whose success reply is OK.
proc ::compute_broker::IpCommand {command ip arglist} {
    set opts [ParseOptions [string tolower $command] $arglist \
        {-host -port -timeout -client -token -command}]
    CheckWord ip $ip
    Call $opts "$command $ip[ClientArg $opts]" $command \
        [list [namespace current]::OkReply $command]
}

# What a finished request amounts to, as the arguments of a -command callback:
# {ok result} or {error message errorcode}.
proc ::compute_broker::Outcome {line finish code result errorcode} {
    if {$code ne "ok"} {
        return [list error $result $errorcode]
    }
    if {[catch {Finished $line $finish $result} value opts]} {
        set errorcode {COMPUTE_BROKER PROTOCOL {}}
        if {[dict exists $opts -errorcode]} {set errorcode [dict get $opts -errorcode]}
        return [list error $value $errorcode]
    }
    return [list ok $value]
}

proc ::compute_broker::Finished {line finish reply} {
    CheckReply $line $reply
    return [{*}$finish $reply]
}

# A -command request has finished: the callback gets its outcome, at global level (an error
# it raises goes to bgerror, from Finish).
proc ::compute_broker::Deliver {line finish callback code result errorcode} {
    uplevel #0 [list {*}$callback {*}[Outcome $line $finish $code $result $errorcode]]
}

# Raises (in the caller) the error a reply to the request line stands for, if any:
# INTERRUPTED for PING's "ERROR: Worker interrupted ?deadline?", BROKER_ERROR for any other
# ERROR line. Remembers the verdict of PING and RELEASE for interrupted.
proc ::compute_broker::CheckReply {line reply} {
    variable interruptions
    lassign [regexp -all -inline {\S+} $line] command ip
    set command [string toupper $command]
    if {![string match ERROR* $reply]} {
        if {$command in {PING RELEASE}} {
            unset -nocomplain interruptions($ip)
        }
        return
    }
    if {[regexp -nocase {^ERROR:?[ \t]*auth required} $reply]} {
        return -code error -level 2 -errorcode [list COMPUTE_BROKER AUTH $reply] \
            "$reply (the broker wants a token: -token, configure -token or\
            COMPUTE_BROKER_TOKEN)"
    }
    if {$command eq "PING" && [regexp -nocase \
            {^ERROR:?[ \t]*Worker interrupted(?:[ \t]+(\S+).*)?$} $reply -> text]} {
        set deadline [IsoUtc $text]
        set interruptions($ip) $deadline
        if {$deadline ne ""} {
            set message "worker $ip interrupted: it goes away at $deadline"
        } elseif {$text ne ""} {
            set message "worker $ip interrupted (unreadable deadline \"$text\")"
        } else {
            set message "worker $ip interrupted (no deadline given)"
        }
        return -code error -level 2 \
            -errorcode [list COMPUTE_BROKER INTERRUPTED $ip $deadline] "compute_broker: $message"
    }
    return -code error -level 2 -errorcode [list COMPUTE_BROKER BROKER_ERROR $reply] $reply
}

# An ISO 8601 time with Z or an offset (fractions of a second dropped) as
# YYYY-MM-DDTHH:MM:SSZ in UTC; "" if it is not one.
proc ::compute_broker::IsoUtc {text} {
    set re {^([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:[.,][0-9]+)?}
    append re {(?:[Zz]|([+-])([0-9]{2}):?([0-9]{2}))$}
    if {![regexp $re $text -> date time sign hours minutes]} {
        return ""
    }
    set format {%Y-%m-%d %H:%M:%S}
    if {[catch {clock scan "$date $time" -format $format -gmt 1} seconds]
            || [clock format $seconds -format $format -gmt 1] ne "$date $time"} {
        return ""    ;# e.g. month 13: clock scan would roll it over
    }
    if {$sign ne ""} {
        scan $hours %d hours
        scan $minutes %d minutes
        if {$hours > 23 || $minutes > 59} {
            return ""
        }
        set offset [expr {$hours * 3600 + $minutes * 60}]
        set seconds [expr {$sign eq "+" ? $seconds - $offset : $seconds + $offset}]
    }
    return [clock format $seconds -format {%Y-%m-%dT%H:%M:%SZ} -gmt 1]
}

# Runs a request and waits for it: returns {code result errorcode} as Start's callback gets
# them. In a coroutine it yields to the event loop until the reply (or the timeout) resumes
# it, so other events and coroutines run meanwhile; anywhere else, and in a coroutine that
# cannot yield (an event handler run by a vwait or update inside one), it waits in a vwait of
# its own, so calls may nest (e.g. from event handlers). If the coroutine is deleted while it
# waits, the request is abandoned.
proc ::compute_broker::Wait {host port auth line timeout command} {
    variable seq
    set var [namespace current]::wait[incr seq]
    upvar #0 $var W
    set W(coro) [info coroutine]
    set W(token) [Start $host $port $auth $line $timeout $command \
        [list [namespace current]::Wake $var]]
    if {$W(coro) ne ""} {
        set trace [list [namespace current]::CoroutineTrace $var]
        trace add command $W(coro) {rename delete} $trace
        # Whoever else resumes the coroutine meanwhile gets "" and it goes back to waiting.
        while {![info exists W(outcome)]} {
            if {[catch {yield}]} {
                # "cannot yield: C stack busy": wait in a vwait instead.
                set W(coro) ""
                break
            }
        }
        trace remove command [info coroutine] {rename delete} $trace
    }
    if {![info exists W(outcome)]} {
        vwait ${var}(outcome)
    }
    set outcome $W(outcome)
    unset W
    return $outcome
}

# Start's callback for Wait: records the outcome and resumes the waiting coroutine, if any.
proc ::compute_broker::Wake {var code result errorcode} {
    upvar #0 $var W
    if {![info exists W(token)]} return
    set W(outcome) [list $code $result $errorcode]
    if {$W(coro) ne ""} {
        $W(coro)
    }
}

# Command trace on a waiting coroutine: follows a rename; a deletion abandons the request.
proc ::compute_broker::CoroutineTrace {var old new op} {
    upvar #0 $var W
    if {![info exists W(token)]} return
    if {$op eq "rename" && $new ne ""} {
        set W(coro) $new
        return
    }
    Cancel $W(token)
    unset W
}

# Asynchronous request. Returns a token; later, from the event loop, calls
#   {*}$callback ok <reply line> {}    or    {*}$callback error <message> <errorcode>
# exactly once, unless Cancel is called first. With an access token auth (not ""), the
# connection sends "AUTH $auth" first and the line only after the broker's OK (phases:
# connect, auth, reply); an ERROR reply to AUTH is an AUTH error. The timeout covers it all.
proc ::compute_broker::Start {host port auth line timeout command callback} {
    variable seq
    set token [namespace current]::call[incr seq]
    upvar #0 $token S
    array set S [list host $host port $port auth $auth line $line timeout $timeout \
        command $command callback $callback chan "" phase connect timer "" idle ""]
    set S(timer) [after $timeout [list [namespace current]::Timeout $token]]
    if {[catch {socket -async $host $port} chan]} {
        set S(idle) [after 0 [list [namespace current]::Finish $token error \
            "compute_broker: cannot connect to $host:$port: $chan" \
            [list COMPUTE_BROKER UNAVAILABLE "connect to $host:$port: $chan"]]]
        return $token
    }
    set S(chan) $chan
    fconfigure $chan -blocking 0 -translation lf -encoding utf-8 -buffering full
    # Tcl 9 reads strictly by default: a reply that is not valid UTF-8 would be a read error
    # there. Decode it as Tcl 8.6 does, leniently (the reply checks then judge it); Tcl 8.6
    # has no -profile.
    catch {fconfigure $chan -profile replace}
    fileevent $chan writable [list [namespace current]::Connected $token]
    return $token
}

proc ::compute_broker::Connected {token} {
    upvar #0 $token S
    if {![info exists S(chan)]} return
    set chan $S(chan)
    # With several addresses for a name, Tcl tries them in turn; wait for the last.
    if {![catch {fconfigure $chan -connecting} connecting] && $connecting} return
    if {[catch {fconfigure $chan -error} err]} {set err "connection failed"}
    if {$err ne ""} {
        Finish $token error "compute_broker: cannot connect to $S(host):$S(port): $err" \
            [list COMPUTE_BROKER UNAVAILABLE "connect to $S(host):$S(port): $err"]
        return
    }
    fileevent $chan writable {}
    if {$S(auth) ne ""} {
        set S(phase) auth
        Send $token "AUTH $S(auth)"
    } else {
        set S(phase) reply
        Send $token $S(line)
    }
    if {[info exists S(chan)]} {
        fileevent $chan readable [list [namespace current]::Readable $token]
    }
}

# Sends one line on the request's connection; a failure finishes the request (UNAVAILABLE).
proc ::compute_broker::Send {token line} {
    upvar #0 $token S
    if {[catch {puts -nonewline $S(chan) "$line\n"; flush $S(chan)} err]} {
        Finish $token error "compute_broker: cannot send to $S(host):$S(port): $err" \
            [list COMPUTE_BROKER UNAVAILABLE "send to $S(host):$S(port): $err"]
    }
}

# The broker's reply to AUTH: OK sends the request; anything else finishes it.
proc ::compute_broker::Authenticated {token reply} {
    upvar #0 $token S
    set where "$S(host):$S(port)"
    if {[regexp {^OK(\s|$)} $reply]} {
        set S(phase) reply
        Send $token $S(line)
    } elseif {[regexp -nocase {^ERROR:?[ \t]*Unknown command} $reply]} {
        Finish $token error "compute_broker: the broker at $where does not know AUTH (it\
            predates tokens): send no token ($reply)" [list COMPUTE_BROKER AUTH $reply]
    } elseif {[string match ERROR* $reply]} {
        Finish $token error "compute_broker: the broker at $where did not accept the token\
            ($reply)" [list COMPUTE_BROKER AUTH $reply]
    } else {
        Finish $token error "compute_broker: unexpected reply to AUTH from $where: \"$reply\"" \
            [list COMPUTE_BROKER PROTOCOL $reply]
    }
}

proc ::compute_broker::Readable {token} {
    variable maxReply
    upvar #0 $token S
    if {![info exists S(chan)]} return
    set chan $S(chan)
    if {[catch {gets $chan reply} n]} {
        Finish $token error "compute_broker: cannot read from $S(host):$S(port): $n" \
            [list COMPUTE_BROKER UNAVAILABLE "read from $S(host):$S(port): $n"]
        return
    }
    if {$n >= 0} {
        if {[string index $reply end] eq "\r"} {
            set reply [string range $reply 0 end-1]
        }
        if {$S(auth) ne ""} {
            # Should a broker ever echo the token, it goes no further than here.
            set reply [string map [list $S(auth) <token>] $reply]
        }
        if {$S(phase) eq "auth"} {
            Authenticated $token $reply
            return
        }
        Finish $token ok $reply {}
    } elseif {[eof $chan]} {
        set asked [expr {$S(phase) eq "auth" ? "AUTH" : $S(command)}]
        set what "$S(host):$S(port) closed the connection without replying to $asked"
        Finish $token error "compute_broker: $what" [list COMPUTE_BROKER UNAVAILABLE $what]
    } elseif {[chan pending input $chan] > $maxReply} {
        Finish $token error \
            "compute_broker: reply to $S(command) from $S(host):$S(port) is too long" \
            [list COMPUTE_BROKER PROTOCOL "reply longer than $maxReply bytes"]
    }
}

proc ::compute_broker::Timeout {token} {
    upvar #0 $token S
    if {![info exists S(chan)]} return
    set S(timer) ""
    if {$S(phase) eq "connect"} {
        set what "connect to $S(host):$S(port)"
    } elseif {$S(phase) eq "auth"} {
        set what "reply to AUTH from $S(host):$S(port)"
    } else {
        set what "reply to $S(command) from $S(host):$S(port)"
    }
    Finish $token error "compute_broker: timed out after $S(timeout) ms waiting for $what" \
        [list COMPUTE_BROKER TIMEOUT $what]
}

proc ::compute_broker::Finish {token code result errorcode} {
    upvar #0 $token S
    if {![info exists S(callback)]} return
    set callback $S(callback)
    Cancel $token
    if {[catch {{*}$callback $code $result $errorcode} msg opts]} {
        BackgroundError $msg $opts
    }
}

# Abandons a request: cancels its timers, closes its socket, forgets its state.
proc ::compute_broker::Cancel {token} {
    upvar #0 $token S
    if {![info exists S(chan)]} return
    after cancel $S(timer)
    after cancel $S(idle)
    if {$S(chan) ne ""} {
        catch {close $S(chan)}
    }
    unset S
}

proc ::compute_broker::BackgroundError {msg opts} {
    catch {{*}[interp bgerror {}] $msg $opts}
}

# ---------------------------------------------------------------------------------------
# Keep-alive: PING from the event loop (after), one request in flight at a time
# ---------------------------------------------------------------------------------------

proc ::compute_broker::KeepaliveStart {key ip opts} {
    variable keepalives
    KeepaliveStop $key
    lassign [Endpoint $opts] host port timeout
    set interval 60000
    if {[dict exists $opts -interval]} {set interval [dict get $opts -interval]}
    set command ""
    if {[dict exists $opts -command]} {set command [dict get $opts -command]}
    set oninterrupt ""
    if {[dict exists $opts -oninterrupt]} {set oninterrupt [dict get $opts -oninterrupt]}
    set keepalives($key) [dict create ip $ip interval $interval host $host port $port \
        auth [Token $opts] timeout $timeout client [ClientArg $opts] command $command \
        oninterrupt $oninterrupt notified 0 request "" \
        after [after $interval [list [namespace current]::KeepaliveTick $key]]]
}

proc ::compute_broker::KeepaliveStop {key} {
    variable keepalives
    if {![info exists keepalives($key)]} return
    after cancel [dict get $keepalives($key) after]
    set request [dict get $keepalives($key) request]
    if {$request ne ""} {Cancel $request}
    unset keepalives($key)
}

proc ::compute_broker::KeepaliveTick {key} {
    variable keepalives
    if {![info exists keepalives($key)]} return
    set k $keepalives($key)
    set line "PING [dict get $k ip][dict get $k client]"
    dict set keepalives($key) after ""
    dict set keepalives($key) request [Start [dict get $k host] [dict get $k port] \
        [dict get $k auth] $line [dict get $k timeout] PING \
        [list [namespace current]::KeepaliveDone $key]]
}

# A PING's outcome: code ok (result: the OK line), error (the ERROR line or the failure's
# message) or interrupted (result: the deadline, or ""). Schedules the next PING, then calls
# -command every time and -oninterrupt on the first interruption.
proc ::compute_broker::KeepaliveDone {key code result errorcode} {
    variable keepalives
    if {![info exists keepalives($key)]} return
    set ip [dict get $keepalives($key) ip]
    if {$code eq "ok"} {
        if {[catch {CheckReply "PING $ip" $result} msg opts]} {
            set errorcode [dict get $opts -errorcode]
            if {[lindex $errorcode 1] eq "INTERRUPTED"} {
                set code interrupted
                set result [lindex $errorcode 3]
            } else {
                set code error
            }
        } elseif {![regexp {^OK(\s|$)} $result]} {
            set code error
        }
    }
    dict set keepalives($key) request ""
    set k $keepalives($key)
    dict set keepalives($key) after \
        [after [dict get $k interval] [list [namespace current]::KeepaliveTick $key]]
    set callbacks {}
    if {[dict get $k command] ne ""} {
        lappend callbacks [list {*}[dict get $k command] $ip $code $result]
    }
    if {$code eq "interrupted" && ![dict get $k notified]} {
        dict set keepalives($key) notified 1
        if {[dict get $k oninterrupt] ne ""} {
            lappend callbacks [list {*}[dict get $k oninterrupt] $ip $result]
        }
    }
    # The callbacks may stop or restart this schedule (keepalive_stop, replace_worker).
    foreach callback $callbacks {
        if {[catch {uplevel #0 $callback} msg opts]} {
            BackgroundError $msg $opts
        }
    }
}

package provide compute_broker $::compute_broker::version
