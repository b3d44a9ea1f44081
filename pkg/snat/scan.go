package snat

import (
	"bytes"
	"crypto/sha256"
	"hash"
	"strings"
)

// tableScan is what a write and the cheap check need to know of one
// iptables table, read from iptables-save output without parsing its
// rules: a digest of each owned chain's rule lines, and the rules of the
// built-in chains that jump to owned ones.
type tableScan struct {
	// owned are the owned chains' digests (declared chains without rules
	// too).
	owned map[string]*chainSum
	// jumps are, per built-in chain, the specs of its rules that jump to
	// an owned chain; first is the spec of each built-in chain's first
	// rule.
	jumps map[string][]string
	first map[string]string
}

// chainSum digests the rule lines of a chain, in order.
type chainSum struct {
	h   hash.Hash
	sum []byte
}

func (c *chainSum) add(line []byte) {
	if c.h == nil {
		c.h = sha256.New()
	}
	c.h.Write(line)
	c.h.Write([]byte{'\n'})
}

func (c *chainSum) value() []byte {
	if c.sum == nil {
		if c.h == nil {
			c.h = sha256.New()
		}
		c.sum = c.h.Sum(nil)
	}
	return c.sum
}

// sumRules digests a rendered chain like scanSave digests the kernel's.
func sumRules(name string, rules []string) []byte {
	c := &chainSum{}
	for _, r := range rules {
		c.add([]byte("-A " + name + " " + r))
	}
	return c.value()
}

// scanSave reads iptables-save output into a tableScan per table. Rule
// lines of owned chains are digested as iptables-save prints them, which
// is how iptRender writes them.
func scanSave(data []byte) map[string]*tableScan {
	out := map[string]*tableScan{}
	var (
		t    *tableScan
		name string
	)
	for line := range bytes.Lines(data) {
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case len(line) == 0 || line[0] == '#':
		case line[0] == '*':
			name = string(line[1:])
			t = &tableScan{owned: map[string]*chainSum{}, jumps: map[string][]string{}, first: map[string]string{}}
			out[name] = t
		case t == nil:
		case line[0] == ':':
			chain, _, _ := bytes.Cut(line[1:], []byte(" "))
			if bytes.HasPrefix(chain, []byte(ChainPrefix)) {
				if _, ok := t.owned[string(chain)]; !ok {
					t.owned[string(chain)] = &chainSum{}
				}
			}
		case bytes.HasPrefix(line, []byte("-A ")):
			chain, spec, _ := bytes.Cut(line[3:], []byte(" "))
			if bytes.HasPrefix(chain, []byte(ChainPrefix)) {
				c := t.owned[string(chain)]
				if c == nil {
					c = &chainSum{}
					t.owned[string(chain)] = c
				}
				c.add(line)
				continue
			}
			if !isBuiltin(name, string(chain)) {
				continue
			}
			if _, ok := t.first[string(chain)]; !ok {
				t.first[string(chain)] = string(spec)
			}
			if target := jumpTarget(spec); strings.HasPrefix(target, ChainPrefix) {
				t.jumps[string(chain)] = append(t.jumps[string(chain)], string(spec))
			}
		}
	}
	return out
}

// jumpTarget returns the chain a rule spec jumps or goes to.
func jumpTarget(spec []byte) string {
	for _, flag := range []string{" -j ", " -g "} {
		if i := bytes.LastIndex(append([]byte(" "), spec...), []byte(flag)); i >= 0 {
			rest := spec[i+len(flag)-1:]
			target, _, _ := bytes.Cut(rest, []byte(" "))
			return string(target)
		}
	}
	return ""
}
