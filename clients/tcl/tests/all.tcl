# Runs every *.test file in this directory with tcltest; exits 1 when any test fails.
#   tclsh clients/tcl/tests/all.tcl ?tcltest options, e.g. -verbose bpe -match with_worker-*?
# The live-broker tests run when COMPUTE_BROKER_HOST/COMPUTE_BROKER_PORT point at a broker
# (the pytest driver test_tcl_client.py starts a sandbox broker and sets them).
package require Tcl 8.6-
package require tcltest 2.5

::tcltest::configure -testdir [file dirname [file normalize [info script]]]
::tcltest::configure {*}$argv
set failed [::tcltest::runAllTests]
exit [expr {$failed ? 1 : 0}]
