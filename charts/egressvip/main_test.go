package chart

import (
	"os"
	"testing"

	"github.com/egressvip/egressvip/testing/helmtool"
)

// TestMain builds helm (once per machine, into the cache) before the
// tests' timeout starts; helmtool.Require reports the outcome to each test.
func TestMain(m *testing.M) {
	_, _ = helmtool.EnsureHelm()
	os.Exit(m.Run())
}
