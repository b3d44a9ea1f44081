package snat

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestExecRunner drives the real exec path against stand-in binaries: the
// payload goes to iptables-restore --noflush -w on stdin, once per family,
// and its stderr ends up in the error. Without nft on the PATH, auto
// selects iptables-legacy.
func TestExecRunner(t *testing.T) {
	dir := t.TempDir()
	script := func(name, body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, ipt := range []string{"iptables-legacy", "ip6tables-legacy"} {
		script(ipt, `case "$*" in *--version*) echo "iptables v1.8.9 (legacy)";; *) echo "-P POSTROUTING ACCEPT";; esac`)
		script(ipt+"-save", `printf '*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n'`)
		script(ipt+"-restore", `echo "$@" > `+dir+`/`+ipt+`.args; /bin/cat > `+dir+`/`+ipt+`.stdin
echo "iptables-restore: line 3 failed" >&2; exit 1`)
	}
	t.Setenv("PATH", dir)
	m, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	d := dualStack(udp5060)
	err = m.Apply(t.Context(), d)
	if err == nil || strings.Count(err.Error(), "line 3 failed") != 2 {
		t.Fatalf("Apply error = %v, want the restore stderr of both families", err)
	}
	for f, ipt := range map[Family]string{IPv4: "iptables-legacy", IPv6: "ip6tables-legacy"} {
		args, _ := os.ReadFile(filepath.Join(dir, ipt+".args"))
		if got := strings.TrimSpace(string(args)); got != "--noflush -w 5" {
			t.Errorf("%s-restore args %q", ipt, got)
		}
		// The chain, then the hook (none listed) inserted at position 1, in
		// the same restore.
		want := strings.Replace(string(Render(f, d)), "COMMIT\n",
			`-I POSTROUTING 1 -m comment --comment "egressvip: egress SNAT" -j EGRESSVIP-SNAT`+"\nCOMMIT\n", 1)
		stdin, _ := os.ReadFile(filepath.Join(dir, ipt+".stdin"))
		if string(stdin) != want {
			t.Errorf("%s-restore got\n%s\nwant\n%s", ipt, stdin, want)
		}
	}
}
