package snat

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"

	"github.com/coreos/go-iptables/iptables"
)

// Runner is the kernel side of one family's iptables: bulk writes and one
// read of every table. The real one runs the iptables binaries; tests pass
// fakes.
type Runner interface {
	// Restore feeds payload to iptables-restore --noflush.
	Restore(ctx context.Context, payload []byte) error
	// Save returns every table as iptables-save prints it. For
	// iptables-legacy only the tables that exist are listed, and none is
	// created.
	Save(ctx context.Context) ([]byte, error)
}

// backend names the binaries of one iptables flavour.
type backend struct {
	name     string
	binaries [2][3]string // per family: iptables, -restore, -save
}

var (
	legacyBackend = backend{"legacy", [2][3]string{
		{"iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save"},
		{"ip6tables-legacy", "ip6tables-legacy-restore", "ip6tables-legacy-save"},
	}}
	nftBackend = backend{"nft", [2][3]string{
		{"iptables-nft", "iptables-nft-restore", "iptables-nft-save"},
		{"ip6tables-nft", "ip6tables-nft-restore", "ip6tables-nft-save"},
	}}
)

// execRunner runs the restore and save binaries of one family.
type execRunner struct {
	restore, save string
	restoreWait   bool
}

// lockWait is how long (seconds) a call waits for the xtables lock.
const lockWait = 5

func newExecRunner(f Family, paths [3]string) (*execRunner, error) {
	proto := iptables.ProtocolIPv4
	if f == IPv6 {
		proto = iptables.ProtocolIPv6
	}
	ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Path(paths[0]), iptables.Timeout(lockWait))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", paths[0], err)
	}
	// iptables-restore learnt -w in 1.6.2.
	v1, v2, v3 := ipt.GetIptablesVersion()
	wait := v1 > 1 || (v1 == 1 && (v2 > 6 || (v2 == 6 && v3 >= 2)))
	return &execRunner{restore: paths[1], save: paths[2], restoreWait: wait}, nil
}

func (r *execRunner) Restore(ctx context.Context, payload []byte) error {
	args := []string{"--noflush"}
	if r.restoreWait {
		args = append(args, "-w", fmt.Sprint(lockWait))
	}
	cmd := exec.CommandContext(ctx, r.restore, args...)
	cmd.Stdin = bytes.NewReader(payload)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w: %s", r.restore, err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

func (r *execRunner) Save(ctx context.Context) ([]byte, error) {
	cmd := exec.CommandContext(ctx, r.save)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %s", r.save, err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}
