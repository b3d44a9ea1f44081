package snat

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"

	"github.com/coreos/go-iptables/iptables"
)

// Runner is the kernel side of one family's nat table: bulk writes and
// reads of the whole table, and the listings the hook and the cheap check
// need. The real one runs iptables binaries; Fake keeps a Table.
type Runner interface {
	// Restore feeds payload to iptables-restore --noflush.
	Restore(ctx context.Context, payload []byte) error
	// Save returns the nat table as iptables-save -t nat prints it.
	Save(ctx context.Context) ([]byte, error)
	// List returns the rules of a nat chain as "-A CHAIN ..." lines.
	List(chain string) ([]string, error)
	// ListAt returns rule pos (1-based) of a nat chain as an "-A CHAIN ..."
	// line; an error when the chain or the rule does not exist.
	ListAt(chain string, pos int) (string, error)
	// ListChains returns the names of all nat chains.
	ListChains() ([]string, error)
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

// execRunner runs the binaries of one family: go-iptables for single rules,
// iptables-restore and iptables-save for the table.
type execRunner struct {
	ipt           *iptables.IPTables
	bin           string
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
	return &execRunner{ipt: ipt, bin: paths[0], restore: paths[1], save: paths[2], restoreWait: wait}, nil
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
	cmd := exec.CommandContext(ctx, r.save, "-t", "nat")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %s", r.save, err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

func (r *execRunner) List(chain string) ([]string, error) {
	lines, err := r.ipt.List("nat", chain)
	if err != nil {
		return nil, err
	}
	var rules []string
	for _, l := range lines {
		if strings.HasPrefix(l, "-A ") {
			rules = append(rules, l)
		}
	}
	return rules, nil
}

func (r *execRunner) ListAt(chain string, pos int) (string, error) {
	// go-iptables' ListById indexes an empty answer.
	cmd := exec.Command(r.bin, "-w", fmt.Sprint(lockWait), "-t", "nat", "-S", chain, fmt.Sprint(pos))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s -S %s %d: %w: %s", r.bin, chain, pos, err, strings.TrimSpace(stderr.String()))
	}
	for l := range strings.Lines(string(out)) {
		if strings.HasPrefix(l, "-A ") {
			return strings.TrimSpace(l), nil
		}
	}
	return "", fmt.Errorf("%s -S %s %d: no such rule", r.bin, chain, pos)
}

func (r *execRunner) ListChains() ([]string, error) { return r.ipt.ListChains("nat") }
