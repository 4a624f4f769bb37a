// Testbench: reads one case's $readmemh files (examples/rtl/README.md) from +vectors=<folder>, streams
// every (row t, output channel n) dot product through int8_dot_requant, and checks every int32
// accumulator and every int8 output bit for bit. Prints PASS or FAIL with the first mismatch.
`timescale 1ns / 1ps
module tb;
    parameter MAX_X = 1 << 16;  // T * K
    parameter MAX_W = 1 << 20;  // N * K
    parameter MAX_N = 1 << 14;  // N
    parameter MAX_Y = 1 << 16;  // T * N

    reg [31:0] dims [0:2];         // T, K, N
    reg [7:0]  x_mem [0:MAX_X-1];  // int8 [T x K], row-major
    reg [7:0]  w_mem [0:MAX_W-1];  // int8 [N x K], row-major
    reg [31:0] m_mem [0:MAX_N-1];  // M per output channel
    reg [7:0]  s_mem [0:MAX_N-1];  // shift per output channel
    reg [31:0] acc_mem [0:MAX_Y-1];  // expected int32 [T x N]
    reg [7:0]  out_mem [0:MAX_Y-1];  // expected int8 [T x N]

    reg clk = 0, rst = 1, valid = 0, clear = 0;
    reg signed [7:0] a = 0, b = 0;
    reg signed [31:0] m = 0;
    reg [4:0] shift = 0;
    wire signed [31:0] acc;
    wire signed [7:0] out;
    int8_dot_requant dut (.clk(clk), .rst(rst), .valid(valid), .clear(clear), .a(a), .b(b), .m(m),
                          .shift(shift), .acc(acc), .out(out));
    always #5 clk = ~clk;

    reg [8*1024-1:0] dir, path;
    integer T, K, N, t, n, k, i, errors;

    task load;  // $readmemh of <dir>/<name>, exactly `words` words, into the memory `which` names
        input [8*16-1:0] name;
        input integer which, words;
        begin
            $sformat(path, "%0s/%0s", dir, name);
            case (which)
                0: $readmemh(path, dims, 0, words - 1);    1: $readmemh(path, x_mem, 0, words - 1);
                2: $readmemh(path, w_mem, 0, words - 1);   3: $readmemh(path, m_mem, 0, words - 1);
                4: $readmemh(path, s_mem, 0, words - 1);   5: $readmemh(path, acc_mem, 0, words - 1);
                6: $readmemh(path, out_mem, 0, words - 1);
            endcase
        end
    endtask

    initial begin
        if (!$value$plusargs("vectors=%s", dir)) begin
            $display("FAIL: no vectors: run with +vectors=<folder>");
            $finish;
        end
        load("dims.hex", 0, 3);
        T = dims[0]; K = dims[1]; N = dims[2];
        if (T < 1 || K < 1 || N < 1 || T * K > MAX_X || N * K > MAX_W || N > MAX_N || T * N > MAX_Y) begin
            $display("FAIL: dims T=%0d K=%0d N=%0d exceed this testbench's memories (raise MAX_* with -P)", T, K, N);
            $finish;
        end
        load("x.hex", 1, T * K); load("w.hex", 2, N * K); load("m.hex", 3, N); load("shift.hex", 4, N);
        load("acc.hex", 5, T * N); load("out.hex", 6, T * N);
        // a file shorter than dims.hex says leaves its last word unknown (iverilog also prints a WARNING)
        if (^x_mem[T * K - 1] === 1'bx || ^w_mem[N * K - 1] === 1'bx || ^m_mem[N - 1] === 1'bx ||
            ^s_mem[N - 1] === 1'bx || ^acc_mem[T * N - 1] === 1'bx || ^out_mem[T * N - 1] === 1'bx) begin
            $display("FAIL: a vector file has fewer words than dims.hex says (T=%0d K=%0d N=%0d)", T, K, N);
            $finish;
        end
        errors = 0;
        @(negedge clk) rst = 0;
        for (t = 0; t < T; t = t + 1)
            for (n = 0; n < N; n = n + 1) begin
                m = m_mem[n]; shift = s_mem[n][4:0];
                for (k = 0; k < K; k = k + 1) begin
                    a = x_mem[t * K + k]; b = w_mem[n * K + k]; valid = 1; clear = (k == 0);
                    @(negedge clk);
                end
                valid = 0;
                #1;  // out settles from acc, m, shift
                i = t * N + n;
                if (acc !== acc_mem[i]) begin
                    if (errors == 0)
                        $display("FAIL: first mismatch acc[%0d] (t=%0d, n=%0d): expected %0d, got %0d",
                                 i, t, n, $signed(acc_mem[i]), acc);
                    errors = errors + 1;
                end
                if (out !== out_mem[i]) begin
                    if (errors == 0)
                        $display("FAIL: first mismatch out[%0d] (t=%0d, n=%0d): expected %0d, got %0d",
                                 i, t, n, $signed(out_mem[i]), out);
                    errors = errors + 1;
                end
            end
        if (errors == 0)
            $display("PASS: %0d accumulators and %0d int8 outputs bit for bit (T=%0d K=%0d N=%0d)", T * N, T * N, T, K, N);
        else
            $display("FAIL: %0d mismatches in %0d accumulators and %0d outputs (T=%0d K=%0d N=%0d)",
                     errors, T * N, T * N, T, K, N);
        $finish;
    end
endmodule
