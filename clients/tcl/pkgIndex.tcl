# Tcl package index for compute_broker (add this directory, or its parent, to auto_path).
if {![package vsatisfies [package provide Tcl] 8.6-]} {return}
package ifneeded compute_broker 0.1.0 \
    [list source -encoding utf-8 [file join $dir compute_broker.tcl]]
