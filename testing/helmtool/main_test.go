package helmtool

import (
	"os"
	"testing"
)

// TestMain builds helm before the tests' timeout starts; Require reports
// the outcome to each test.
func TestMain(m *testing.M) {
	_, _ = EnsureHelm()
	os.Exit(m.Run())
}
