// The test service, as an IDL. No thrift compiler is installed here, so calc.py holds the
// same structs written by hand as the Python generator would describe them (thrift_spec).
namespace py calc

exception DivideByZero { 1: string message }

struct Point { 1: i32 x, 2: i32 y, 3: optional string label }

service Calculator {
  void ping(),
  i32 add(1: i32 a, 2: i32 b),
  string echo(1: string text),
  i32 divide(1: i32 a, 2: i32 b) throws (1: DivideByZero ouch),
  list<double> stats(1: map<string, list<i64>> series, 2: set<bool> flags, 3: list<Point> points, 4: double scale),
  i32 crash(),
  oneway void log(1: string line),
}
