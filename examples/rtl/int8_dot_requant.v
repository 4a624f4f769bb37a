// int8 x int8 dot product with int32 accumulation, then the `single` requantization to int8.
//
//   acc <- (clear ? 0 : acc) + a * b          each cycle with valid: int8 x int8 -> int16, summed in int32
//   out  = sat8((acc * m + 2^(s-1)) >>> s)    s = 31 + shift, m in [2^30, 2^31), shift in [0, 31]
//
// `out` is combinational from acc, m and shift (a 32x32 -> 64-bit multiply, a 64-bit barrel shift and a
// clamp); a pipelined design would register it. The rule is common/quant/requant.py requantize_single,
// bit for bit (docs/integer.md). Synthesizable Verilog-2005; the accumulator wraps at 32 bits like any
// int32 adder (K * 128 * 128 < 2^31 for K < 131072 keeps it exact).
`timescale 1ns / 1ps
module int8_dot_requant (
    input  wire               clk,
    input  wire               rst,    // synchronous: clears the accumulator
    input  wire               valid,  // a and b hold one pair this cycle
    input  wire               clear,  // with valid: this pair starts a new dot product
    input  wire signed [7:0]  a,
    input  wire signed [7:0]  b,
    input  wire signed [31:0] m,      // requantization multiplier M (Q0.31)
    input  wire        [4:0]  shift,  // right shift after M's 31
    output reg  signed [31:0] acc,
    output wire signed [7:0]  out
);
    always @(posedge clk) begin
        if (rst)
            acc <= 32'sd0;
        else if (valid)
            acc <= (clear ? 32'sd0 : acc) + a * b;  // int8 x int8 -> int16, sign-extended into int32
    end

    wire        [5:0]  s       = 6'd31 + {1'b0, shift};     // total right shift, 31..62
    wire signed [63:0] prod    = acc * m;                    // int32 x int32 -> int64 (|prod| < 2^62)
    wire signed [63:0] rounded = prod + (64'sd1 <<< (s - 6'd1));  // + 2^(s-1): round half up
    wire signed [63:0] q       = rounded >>> s;              // arithmetic shift: floor
    assign out = (q > 64'sd127) ? 8'sd127 : (q < -64'sd128) ? -8'sd128 : q[7:0];  // saturate to int8
endmodule
