# shellcheck shell=bash
# Helpers shared by the launchers in this folder; sourced by them, not run.
#
# Written for bash 3.2 too (macOS's /bin/bash), because tpu_vm.sh and xpk.sh usually run on a
# laptop: no associative arrays, and empty arrays expanded as ${a[@]+"${a[@]}"} under `set -u`.
#
#   usage               print the sourcing script's header comment (its documentation), exit 0
#   die MSG             print "SCRIPT: error: MSG" to stderr, exit 2
#   require VALUE WHAT  die "WHAT is required" when VALUE is empty
#   split_flag ARG      set FLAG, VALUE and HAS_VALUE from `--flag=value` (or a bare `--flag`)
#   quote ARGS...       print ARGS shell-quoted on one line, quoting only where needed
#   run ARGS...         run the command, or when DRY_RUN=1 print it (quoted) instead

SCRIPT_NAME=$(basename "$0")

usage() {
  # The header is every line from line 2 up to the first line that is not a comment, so the
  # documentation lives in one place: the top of the script.
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
  exit 0
}

die() {
  echo "${SCRIPT_NAME}: error: $*" >&2
  echo "Run '${SCRIPT_NAME} --help' for the variables and flags." >&2
  exit 2
}

require() {
  [[ -n "$1" ]] || die "$2 is required"
}

# The sourcing script reads FLAG, VALUE and HAS_VALUE.
# shellcheck disable=SC2034
split_flag() {
  case "$1" in
    --*=*) FLAG=${1%%=*}; VALUE=${1#*=}; HAS_VALUE=1 ;;
    *) FLAG=$1; VALUE=''; HAS_VALUE=0 ;;
  esac
}

quote() {
  # printf %q would also work but prints backslash soup; single quotes read better in dry runs and
  # in the remote command strings that gcloud and srun hand to a shell.
  # The replacement strings sit in variables: quote removal inside ${var//pat/rep} differs
  # between bash 3.2 and 4.3+, while expanded variables behave the same everywhere.
  local out='' arg q="'" escaped_q="'\\''"
  for arg in "$@"; do
    if [[ -n "$arg" && "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//$q/$escaped_q}' "
    fi
  done
  printf '%s\n' "${out% }"
}

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}
