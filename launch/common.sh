# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).

DRY_RUN="${DRY_RUN:-0}"

# Prints one command as a shell line a person can copy (single quotes only where needed).
print_command() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="$arg "
    elif [[ "$arg" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then  # --flag='value'
      out+="${BASH_REMATCH[1]}'${BASH_REMATCH[2]//\'/\'\\\'\'}' "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

# Runs a command, or only prints it with --dry-run. Real runs echo it first, so the log shows what happened.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    print_command "$@"
  else
    printf '+ ' >&2
    print_command "$@" >&2
    "$@"
  fi
}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

# require VAR --flag: stops before anything runs when a required setting is empty, naming both ways to give it.
require() {
  local var="$1" flag="$2"
  if [[ -z "${!var:-}" ]]; then
    die "$var is not set: pass $flag=VALUE or export $var=VALUE (see --help)."
  fi
}
